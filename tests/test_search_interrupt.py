"""Ctrl-C during `onnxconet search`: one line naming the last finished trial, exit 130, history intact, and
--resume continues without redoing a finished trial."""

from __future__ import annotations

import json
import os
import signal

from tests.conftest import search_process, wait_for

HANG = 900  # seconds: a hang guard (about 90 s for both runs on an idle machine; many times that when loaded)


def _trials(out) -> list[dict]:
    path = out / "history.jsonl"
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in map(json.loads, lines) if r["kind"] == "trial"]


def test_ctrl_c_stops_with_one_line_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    with search_process(out) as proc:
        wait_for(lambda: _trials(out) or proc.poll() is not None, HANG, "the first finished trial")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, stderr = proc.communicate(timeout=HANG)
    finished = _trials(out)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    line = f"interrupted after trial {finished[-1]['trial']}; continue with --resume"
    assert lines[-1] == line and stderr.count("interrupted") == 1, stderr

    with search_process(out, "--resume") as proc:
        _, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, stderr
    trials = _trials(out)
    assert [t["trial"] for t in trials] == [0, 1]
    assert trials[: len(finished)] == finished  # the finished trials, untouched
    assert f"resumed after {len(finished)} finished trials" in stderr
    shown = {ln.strip().split(":")[0] for ln in stderr.splitlines() if ln.strip().startswith("trial ")}
    assert shown == {f"trial {t['trial']}" for t in trials[len(finished) :]}, stderr  # none trained again
    assert (out / "best.onnx").is_file() and json.loads((out / "result.json").read_text())["trials"] == trials
