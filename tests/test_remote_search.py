"""A search whose latency is measured on a device through its agent: it meets the budget the agent re-measures,
and a device that disappears mid-run stops the run cleanly; --resume continues it once the device is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from onnxconet.commands.search import run_search
from onnxconet.latency import device as devices
from onnxconet.latency.profile import Target, measure_isolated
from tests.conftest import (
    AGENT_TOKEN,
    ROOT,
    _sigint_default,
    running_agent,
    search_cfg,
    search_process,
    wait_for,
)
from tests.loopback_sshd import free_port


def _upscaled(npz_data: str, tmp_path, factor: int = 4) -> str:
    """The tiny problem at `factor` times the resolution: at 16x16 the tiny model runs in ~30 us, where process-to-
    process spread decides a deployed ratio (0.45-1.69 over 4 pairs of one file, seen here); at 64x64 its
    convolutions do."""
    data = np.load(npz_data.split(":", 1)[1])
    x = data["x"].repeat(factor, axis=2).repeat(factor, axis=3)
    path = tmp_path / "tiny64.npz"
    np.savez(path, x=x, y=data["y"])
    return f"npz:{path}"


@pytest.mark.slow  # 70-90 s, and its deployed ratios move 0.64-1.02 on a loaded 2-core machine (CI missed 0.8 by 0.7 %)
def test_search_on_the_agent_meets_the_budget_the_agent_measures(tmp_path, npz_data):
    (tmp_path / "agent").mkdir()
    data = _upscaled(npz_data, tmp_path)
    with running_agent(tmp_path / "agent") as (agent, port):
        url = f"http://127.0.0.1:{port}"
        devices.connect(url, AGENT_TOKEN)
        cfg = search_cfg(
            tmp_path,
            data,
            input_shape=(1, 3, 64, 64),
            budget_on="latency",
            budget="0.8",
            latency_target=url,
            trials=2,  # the second is placed on the cost refitted on the first's measurement
            pretrain_epochs=1,
            deployed_pairs=4,
            probes=4,  # the predictor's calibration through the agent: 12 probes took 20 s of this test's 90
        )
        result = run_search(cfg).to_json()
        best = result["best"]
        assert result["provenance"]["device"] == url and result["config"]["latency_target"] == url
        why = {k: best.get(k) for k in ("trial", "latency_ratio", "confirm_ratios")} | {
            "trials": [(t["trial"], t.get("latency_ratio")) for t in result["trials"]],
            "deployed": best["latency"].get("ratios"),
        }
        assert best["budget_met"] and best["latency_ratio"] <= 0.8, why
        again = measure_isolated(
            best["onnx"], result["baseline"]["onnx"], Target("cpu", 1, device=url), pairs=4
        )
        # re-measured by the agent (10 %: two measurements' spread)
        assert again.ratio <= 0.8 * 1.1, (again.ratios, why)
        assert any(f.endswith(".onnx") for f in os.listdir(agent.folder))  # the files went to the device


def _agent(port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxconet", "agent", "--port", str(port), "--token", AGENT_TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, preexec_fn=_sigint_default,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("onnxconet agent on http://127.0.0.1:")
    return proc


@pytest.mark.slow  # 73 s in CI (two searches through an agent that is stopped and started again)
def test_a_target_that_disappears_stops_the_search_and_resume_continues(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    history = out / "history.jsonl"
    remote = ("--target", url, "--token", AGENT_TOKEN)
    agent = _agent(port)
    try:
        with search_process(out, *remote, trials=3) as proc:
            wait_for(lambda: history.is_file() and '"trial": 0' in history.read_text(), 600, "trial 0")
            agent.terminate()
            agent.wait(30)
            proc.wait(300)
            err = proc.stderr.read()
            assert proc.returncode == 1, err
            assert url in err and "cannot reach the agent" in err and "--resume" in err, err
        lines = [json.loads(line) for line in history.read_text().splitlines()]
        first = [r for r in lines if r.get("kind") != "header" and "widths" in r]
        assert first and first[0]["trial"] == 0
        agent = _agent(port)
        with search_process(out, *remote, "--resume", trials=3) as proc:
            proc.wait(600)
            assert proc.returncode == 0, proc.stderr.read()
    finally:
        agent.terminate()
        agent.wait(30)
    result = json.loads((out / "result.json").read_text())
    assert [t["trial"] for t in result["trials"]] == [0, 1, 2]
    assert result["trials"][0]["widths"] == first[0]["widths"]  # the finished trial was kept, not redone
    assert result["trials"][0]["seconds"] == first[0]["seconds"]
    assert result["provenance"]["device"] == url
