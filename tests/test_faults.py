"""Failpoints (onnxconet/faults.py) and what tools/fault_inject.py checks with them: a process killed at a named
moment, a file killed half-written, and a search killed at the moments where its checkpoints and history could
disagree, resumed to the uninterrupted run's result."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from onnxconet import faults
from tests.conftest import tiny_search_args

_spec = importlib.util.spec_from_file_location(
    "fault_inject", Path(__file__).parents[1] / "tools" / "fault_inject.py"
)
fault_inject = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_inject)


def _python(code: str, tmp_path: Path, fault: str | None = None, log: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXCONET_FAULT")}
    if fault:
        env[faults.ENV] = fault
    if log:
        env[faults.LOG_ENV] = str(log)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)


def test_parse():
    assert faults.parse("trial 3/epoch 1 end:2") == ("trial 3/epoch 1 end", 2)
    assert faults.parse("setup/exported") == ("setup/exported", 1)
    assert faults.parse("odd:name:x") == ("odd:name:x", 1)


def test_a_point_kills_at_its_occurrence_and_logs_the_census(tmp_path):
    code = (
        "from onnxconet import faults\n"
        "faults.point('a'); print('one', flush=True)\n"
        "with faults.phase('trial 0'):\n"
        "    faults.point('a'); print('two', flush=True)\n"
        "faults.point('a'); print('three', flush=True)\n"
    )
    log = tmp_path / "census"
    done = _python(code, tmp_path, log=log)
    assert done.returncode == 0 and done.stdout.split() == ["one", "two", "three"]
    assert log.read_text().split("\n")[:3] == ["setup/a", "trial 0/a", "setup/a"]
    killed = _python(code, tmp_path, fault="setup/a:2")
    assert killed.returncode == -9 and killed.stdout.split() == ["one", "two"]


def test_a_write_killed_halfway_leaves_the_old_file_and_a_repairable_history(tmp_path):
    (tmp_path / "r.json").write_text('{"old": 1}')
    code = (
        "from onnxconet.files import append_jsonl, atomic_write\n"
        "append_jsonl('h.jsonl', {'kind': 'header'})\n"
        "append_jsonl('h.jsonl', {'kind': 'trial', 'trial': 0, 'pad': 'x' * 100})\n"
        "atomic_write('r.json', '{\"new\": 2}')\n"
    )
    assert _python(code, tmp_path, fault="setup/write:h.jsonl:2").returncode == -9
    cut = (tmp_path / "h.jsonl").read_text()
    assert cut.startswith('{"kind": "header"}\n') and not cut.endswith("\n")  # half a line on disk
    assert _python(code, tmp_path, fault="setup/write:r.json").returncode == -9
    assert json.loads((tmp_path / "r.json").read_text()) == {"old": 1}  # the old file, whole
    assert (tmp_path / "r.json.tmp").is_file()
    assert _python(code, tmp_path).returncode == 0
    lines = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [x.get("trial") for x in lines] == [None, None, 0, None, 0]  # the cut line was dropped, not glued
    assert json.loads((tmp_path / "r.json").read_text()) == {"new": 2}


def test_choose_spreads_kills_over_phases_in_run_order():
    census = [("setup/exported", 1), ("pretrain/epoch 1 end", 1)]
    census += [(f"trial {t}/epoch 1 {w}", 1) for t in range(5) for w in ("half", "end")]
    census += [
        ("trial 4/write:history.jsonl", 1),
        ("finish/write:best.onnx", 1),
        ("finish/write:best.onnx", 2),
    ]
    picked = fault_inject.choose(census, 6)
    assert len(picked) == 6
    assert picked == sorted(picked, key=census.index)
    assert {fault_inject.phase_of(n) for n, _ in picked} == {
        "setup", "pretrain", "trial training", "write history.jsonl", "write best.onnx",
    }  # fmt: skip


def test_restore_bank_takes_the_pending_bank_only_of_a_committed_trial(tmp_path):
    """bank.next.pt is written before the trial's history line and renamed to bank.pt after it: a kill between
    the two leaves it pending, and the history decides whether it holds a finished trial's training."""
    from torch import nn

    from onnxconet.search.driver import restore_bank
    from onnxconet.surgery.inherit import WeightBank

    def bank_file(name, value, after_trial):
        state = {k: torch.full_like(v, value) for k, v in nn.Linear(2, 2).state_dict().items()}
        torch.save({"after_trial": after_trial, "bank": state}, tmp_path / name)

    bank = WeightBank(nn.Linear(2, 2))
    bank_file("bank.pt", 1.0, 0)
    bank_file("bank.next.pt", 2.0, 1)
    assert restore_bank(bank, tmp_path, [{"trial": 0}])  # trial 1 never reached the history: it is run again
    assert not (tmp_path / "bank.next.pt").exists()
    assert torch.all(bank.state["weight"] == 1.0)
    bank_file("bank.next.pt", 2.0, 1)
    assert restore_bank(bank, tmp_path, [{"trial": 0}, {"trial": 1}])  # committed, killed before the rename
    assert torch.all(bank.state["weight"] == 2.0)
    assert not (tmp_path / "bank.next.pt").exists() and torch.load(tmp_path / "bank.pt")["after_trial"] == 1


@pytest.mark.slow  # 62-96 s (two searches and a chain of killed runs); tools/fault_inject.py covers every point
def test_a_search_killed_where_history_and_bank_could_disagree_resumes_to_the_same_result(tmp_path, npz_data):
    """Killed after trial 1's history line but before its bank was renamed into place, and halfway through
    writing trial 2's history line, then resumed: the uninterrupted run's trials and best widths."""
    search = tiny_search_args(npz_data, trials=3, latency_seconds=0.05)
    rc, census = fault_inject._run(search, tmp_path / "reference", tmp_path / "census", None, resume=False)
    assert rc == 0, (tmp_path / "reference.err").read_text()[-2000:]
    targets = [("trial 1/history written", 1), ("trial 2/write:history.jsonl", 1)]
    assert set(targets) <= set(census)
    tally, failures = defaultdict(lambda: [0, 0]), []
    left = fault_inject._chain(search, tmp_path / "chain", targets, tally, failures)
    assert left == [] and failures == [], failures
    assert dict(tally) == {"between trials": [1, 1], "write history.jsonl": [1, 1]}
    assert fault_inject.same_result(tmp_path / "reference", tmp_path / "chain") == []
