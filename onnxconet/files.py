"""Writing run files so that a crash never leaves a half-written one: write beside, fsync, rename over."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch


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
