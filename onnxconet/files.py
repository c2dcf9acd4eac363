"""Run files: written so that a crash never leaves a half-written one (write beside, fsync, rename over), and the
run folder's lock (one run writes a folder at a time)."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path

import torch

from onnxconet import faults
from onnxconet.errors import OnnxconetError, WriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def write_error(path: str | os.PathLike, e: OSError) -> WriteError:
    """The one-line error for a failed write of `path`: the system's reason and what to do about it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free space"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {Path(path).parent} writable"
    else:
        fix = "check the disk"
    return WriteError(f"cannot write {path}: {e.strerror or e}; {fix}")


def _write(f, data: bytes) -> None:
    """All of `data` into the open file `f`, forced to disk: where every run file reaches the disk. With faults on
    (onnxconet/faults.py) the first half reaches the disk before the failpoint "write:<file>", the rest after."""
    if faults.active() and len(data) > 1:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        os.fsync(f.fileno())
        faults.point(f"write:{Path(f.name).name.removesuffix('.tmp')}")
        data = data[half:]
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one, never a part.

    Raises:
        WriteError: the disk is full or the folder read-only (`path` is then untouched).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            _write(f, data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None


def remove_partial_writes(folder: str | os.PathLike) -> None:
    """Delete what `atomic_write` of a killed run left beside its files (FILE.tmp: never read, never complete)."""
    for tmp in Path(folder).glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append `record` as one JSON line, forced to disk. A last line that a kill cut short is dealt with first: a
    whole record missing only its newline gets it, a part of one is dropped.

    Raises:
        WriteError: the disk is full or the folder read-only; the part of the line written is taken back, so
            the file holds the lines written before, whole.
    """
    path = Path(path)
    size = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as f:
            _end_last_line(f)
            size = f.seek(0, os.SEEK_END)
            _write(f, (json.dumps(record) + "\n").encode("utf-8"))
    except OSError as e:
        if size is not None:
            try:
                os.truncate(path, size)
            except OSError:
                pass  # a resume drops the cut line (above)
        raise write_error(path, e) from None


def _end_last_line(f) -> None:
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    start, pos = 0, end
    while pos > 0:  # back to the newline before the cut line
        step = min(1 << 16, pos)
        pos -= step
        f.seek(pos)
        i = f.read(step).rfind(b"\n")
        if i >= 0:
            start = pos + i + 1
            break
    f.seek(start)
    try:
        whole = isinstance(json.loads(f.read()), dict)
    except ValueError:
        whole = False
    if whole:
        _write(f, b"\n")
    else:
        f.truncate(start)


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from None
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
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as e:
            os.close(fd)
            raise write_error(self.path, e) from None
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
