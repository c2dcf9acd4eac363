"""Which code produced a result: onnxconet's version and git commit, and the versions of the libraries that
decide its numbers. result.json and best.onnx's metadata carry these (search/finish.py adds where it ran)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from onnxconet import __version__

_CHECKOUT = Path(__file__).resolve().parent.parent


@functools.cache
def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout onnxconet runs from; (None, None) when it is not one (an installed
    package, no git). Never raises."""
    if not (_CHECKOUT / ".git").exists():  # a folder above an installed package may be another repository
        return None, None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True, timeout=10, env=env
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def code_versions() -> dict:
    """onnxconet's version, commit and whether the checkout had uncommitted changes; torch, onnx, onnxruntime."""
    import onnx
    import onnxruntime
    import torch

    commit, dirty = git_commit()
    return {
        "onnxconet": __version__,
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
