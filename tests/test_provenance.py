"""Provenance: which code produced a result (version, git commit, library versions); the search writes it into
result.json and best.onnx (tests/test_search.py checks those)."""

from __future__ import annotations

import shutil
import subprocess

import onnx
import onnxruntime
import torch

import onnxconet
from onnxconet import provenance
from tests.conftest import ROOT


def running_versions() -> dict:
    """What this process runs, read independently of onnxconet.provenance."""
    commit = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    return {
        "onnxconet": onnxconet.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def test_code_versions_are_the_running_ones():
    provenance.git_commit.cache_clear()
    got = provenance.code_versions()
    assert {k: v for k, v in got.items() if k != "dirty"} == running_versions()
    assert got["dirty"] in (True, False) if got["commit"] else got["dirty"] is None


def test_no_checkout_or_no_git_is_none_never_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_CHECKOUT", tmp_path)  # an installed package: no .git beside it
    provenance.git_commit.cache_clear()
    assert provenance.git_commit() == (None, None)
    (tmp_path / ".git").mkdir()  # looks like a checkout, but git cannot run
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    provenance.git_commit.cache_clear()
    assert provenance.git_commit() == (None, None)
    provenance.git_commit.cache_clear()
