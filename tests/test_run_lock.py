"""The run folder's lock: a second search into a folder in use refuses with one line naming the holder's pid; the
lock a killed search left behind is taken over with a warning."""

from __future__ import annotations

import os
import signal

from typer.testing import CliRunner

from onnxconet.cli import app
from tests.conftest import search_process, wait_for

runner = CliRunner()


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    with search_process(out, trials=50) as holder:  # runs until killed below
        # baseline.onnx is written once the run has exported the model and loaded the data
        wait_for(lambda: (out / "baseline.onnx").is_file() or holder.poll() is not None, 900, "the holder")
        assert holder.poll() is None, holder.communicate()[1]
        for extra in ([], ["--resume"]):
            r = runner.invoke(app, ["search", "--budget-on", "flops", "--out", str(out), *extra])
            assert r.exit_code == 1
            line = _one_line(r)
            assert f"pid {holder.pid}" in line and str(out) in line, line
        os.killpg(holder.pid, signal.SIGKILL)  # killed: its lock file still names it
    # a bad --data fails right after the lock is taken: the run needs to get no further
    r = runner.invoke(
        app, ["search", "--budget-on", "flops", "--out", str(out), "--resume", "--data", "npz:nope.npz"]
    )
    assert r.exit_code == 1 and "nope.npz" in r.stderr
    said = " ".join(r.stderr.split())  # the log wraps long lines
    assert f"took over the lock of pid {holder.pid}, which ended without releasing it" in said, r.stderr
    r = runner.invoke(
        app, ["search", "--budget-on", "flops", "--out", str(out), "--resume", "--data", "npz:nope.npz"]
    )
    assert r.exit_code == 1 and "took over" not in r.stderr, (
        r.stderr
    )  # released on the way out: nothing stale
