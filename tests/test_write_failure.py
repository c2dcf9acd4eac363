"""A run file that cannot be written (disk full, read-only folder): one line naming the file, exit 1, the history
and checkpoints intact, and --resume finishes the run once the disk is fine again. The failure is simulated where
the system reports it: os.fsync of that file raises (a history line is cut in half first, as a full disk does)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from onnxconet.cli import app
from tests.conftest import tiny_search_args

runner = CliRunner()


def _args(out: Path, data: str, *extra: str) -> list[str]:
    return ["search", *tiny_search_args(data, "--out", str(out), *extra)]


def _failing_fsync(name: str, nth: int, code: int):
    """os.fsync that fails the `nth` sync of OUT/name (or its .tmp) with `code`; a history line is cut in half."""
    real, seen = os.fsync, {"n": 0}

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if Path(path).name in (name, name + ".tmp"):
            seen["n"] += 1
            if seen["n"] == nth:
                if name.endswith(".jsonl"):  # the disk filled up in the middle of the line
                    text = Path(path).read_bytes()
                    cut = text.rstrip(b"\n").rfind(b"\n") + 1
                    os.ftruncate(fd, cut + (len(text) - cut) // 2)
                raise OSError(code, os.strerror(code))
        return real(fd)

    return fsync


def _history(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]  # every line parses


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file of an fd in /proc")
@pytest.mark.parametrize(
    "name, nth, code",
    [
        ("history.jsonl", 3, errno.ENOSPC),  # the header and trial 0 are written, trial 1's line is cut
        # (the default run keeps the history; -m slow adds a checkpoint, the final phase and the last file)
        pytest.param(
            "best_candidate.pt", 1, errno.ENOSPC, marks=pytest.mark.slow
        ),  # a checkpoint, after trial 0
        pytest.param("best.onnx", 1, errno.EROFS, marks=pytest.mark.slow),  # the final phase
        pytest.param("report.md", 1, errno.ENOSPC, marks=pytest.mark.slow),  # the last file written
    ],
)
def test_a_failed_write_is_one_line_and_resume_finishes(tmp_path, npz_data, monkeypatch, name, nth, code):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _failing_fsync(name, nth, code))
        r = runner.invoke(app, _args(out, npz_data))
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    fix = "free space" if code == errno.ENOSPC else f"make {out} writable"
    assert (
        lines[-1]
        == f"error: cannot write {out / name}: {os.strerror(code)}; {fix} and continue with --resume"
    )
    assert "Traceback" not in r.output and "internal error" not in r.output
    finished = [t for t in _history(out) if t["kind"] == "trial"]
    for ckpt in ("teacher.pt", "bank.pt", "best_candidate.pt"):  # whatever checkpoint exists loads
        if (out / ckpt).is_file():
            torch.load(out / ckpt, weights_only=True)
    assert not list(out.glob("*.tmp"))

    r = runner.invoke(app, _args(out, npz_data, "--resume"))
    assert r.exit_code == 0, r.output
    trials = [t for t in _history(out) if t["kind"] == "trial"]
    assert [t["trial"] for t in trials] == [0, 1] and trials[: len(finished)] == finished
    assert f"resumed after {len(finished)} finished trials" in r.stderr or not finished
    for f in ("best.onnx", "result.json", "report.md", "pareto.png", "best_widths.json"):
        assert (out / f).is_file(), f


def test_append_after_a_kill_cut_the_last_line(tmp_path):
    from onnxconet.files import append_jsonl

    path = tmp_path / "h.jsonl"
    path.write_text('{"a": 1}\n{"b": 2, "c": [1, 2')  # killed mid-line: the part is dropped
    append_jsonl(path, {"d": 3})
    assert path.read_text() == '{"a": 1}\n{"d": 3}\n'
    path.write_text('{"a": 1}\n{"b": 2}')  # killed before the newline only: the record stays
    append_jsonl(path, {"d": 3})
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n{"d": 3}\n'
