"""Run files: written so that a crash never leaves a half-written one (write beside, fsync, rename over), and the
run folder's lock (one run writes a folder at a time)."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch

from onnxconet.errors import OnnxconetError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically (a checkpoint of tensors, loadable with weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


class RunLock:
    """The lock of a run folder, FOLDER/.lock, held with flock for as long as a run writes the folder; the file
    holds the run's pid. A second run into the folder is refused, naming that pid. The kernel drops a dead run's
    flock, so a file that still names a pid when the lock is free was left by a run that died (killed): it is
    taken over with a warning. Use as a `with` block; leaving it empties the file and releases the lock."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _pid_in(fd)
            os.close(fd)
            raise OnnxconetError(
                f"{self.path.parent} is in use by another search (pid {holder or 'unknown'}, see {self.path}); "
                "wait for it to end, or choose another --out"
            ) from None
        stale = _pid_in(fd)
        if stale is not None and stale != os.getpid():
            log.warning(
                "%s: took over the lock of pid %d, which ended without releasing it (killed?)",
                self.path,
                stale,
            )
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a released lock names no one
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
