"""A search on a shared study (search/study.py, search/workers.py, search/parallel.py): exactly N trials finish
however many workers race for them; a killed worker's trial is failed by the heartbeat and run again; on SQLite
and on a real PostgreSQL server started here (tests/pg_server.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import optuna
import pytest

from onnxconet.search.anneal import AnnealStrategy
from onnxconet.search.base import Objective, Strategy, Trial, TrialState
from onnxconet.search.study import StudyMeta, accounting, create_study, existing, open_storage, redact
from onnxconet.search.workers import StudyWorker, fail_stale
from tests.conftest import ROOT, tiny_search_args
from tests.pg_server import loopback_postgres, pg_bin


class Pick(Strategy):
    """Widths from its RNG (keyed by the trial, as every strategy on a study); counts what it was told."""

    def __init__(self) -> None:
        super().__init__(space=None, objective=Objective(0.5), seed=0)
        self.rng = np.random.default_rng(0)
        self.told: list[int] = []

    def ask(self) -> dict[int, int]:
        return {0: int(self.rng.integers(1, 1000))}

    def tell(self, trial: Trial) -> dict:
        self.told.append(trial.number)
        return {"told_before": len(self.told) - 1}


class Quick:
    """An evaluator that 'trains' for `seconds` and scores the widths; remembers what it ran."""

    cg = None

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds, self.ran = seconds, []

    def run(self, number: int, widths: dict[int, int]):
        time.sleep(self.seconds)
        self.ran.append((number, dict(widths)))
        trial = Trial(number, dict(widths), TrialState.COMPLETE, accuracy=widths[0] / 1000, ratio=0.4)
        return trial, None, None


def meta(trials: int) -> StudyMeta:
    base = {"ms": 1.0, "accuracy": 0.9, "test_accuracy": None}
    return StudyMeta(config={}, out="", budget=0.5, baseline=base, fingerprint="f", trials=trials, start=None)


def test_workers_racing_finish_exactly_n_trials_each_once(tmp_path):
    """Four workers (threads, each with its own connection) on one SQLite study of 9 trials: 9 finish, each run
    by one worker, their history records complete; claims beyond 9 are failed as surplus, never run."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_study(open_storage(url), "race", meta(9))
    workers = []

    def work() -> None:
        study = optuna.load_study(storage=open_storage(url), study_name="race")
        w = StudyWorker(study, Pick(), Quick(), 9, tmp_path, heartbeat=5, poll=0.05)
        workers.append(w)
        w.run()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    study = optuna.load_study(storage=open_storage(url), study_name="race")
    trials = study.get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    ran = [n for w in workers for n in w.ran]
    assert len(done) == 9 and sorted(ran) == sorted(t.number for t in done)  # each finished trial run once
    assert Counter(ran).most_common(1)[0][1] == 1
    for t in done:
        rec = t.user_attrs["record"]
        assert rec["trial"] == t.number and rec["widths"] == t.user_attrs["widths"]
        assert math.isclose(t.value, rec["accuracy"])  # the objective: accuracy, the ratio under the budget
    counts = accounting(trials)
    assert counts["finished"] == 9 and counts["lost"] == 0 and counts["running"] == counts["waiting"] == 0
    assert counts["surplus"] == len(trials) - 9
    assert all("record" not in t.user_attrs for t in trials if t.user_attrs.get("surplus"))


def test_a_claim_beyond_the_last_trial_is_surplus_and_never_run(tmp_path):
    """Two workers decide on the same view of a 1-trial study (both see it empty): the second claim is failed at
    once as surplus; exactly one trial runs."""
    study = create_study(open_storage(f"sqlite:///{tmp_path / 'study.db'}"), "last", meta(1))
    a, b = (StudyWorker(study, Pick(), Quick(0.0), 1, tmp_path, heartbeat=5) for _ in range(2))
    view = study.get_trials()  # empty, for both
    first = a.claim(view, 0)
    assert first is not None and b.claim(view, 0) is None
    a.run_trial(*first)
    trials = study.get_trials()
    assert accounting(trials) == {"finished": 1, "running": 0, "waiting": 0, "lost": 0, "surplus": 1}
    assert b.ran == [] and "record" not in trials[1].user_attrs


def test_the_gate_lets_one_measurer_in_while_trainers_pause(tmp_path):
    """MeasureGate between processes: a measurement waits for the batch in flight and holds off new batches."""
    import multiprocessing as mp

    from onnxconet.latency.gate import MeasureGate

    ctx = mp.get_context("spawn")
    started, events = ctx.Event(), ctx.Queue()
    trainer = ctx.Process(target=_train_batches, args=(str(tmp_path), started, events))
    trainer.start()
    started.wait(30)
    gate = MeasureGate(tmp_path)
    with gate.exclusive():
        t_in = time.monotonic()
        time.sleep(0.6)
        t_out = time.monotonic()
    trainer.join(30)
    batches = []
    while not events.empty():
        batches.append(events.get())
    assert trainer.exitcode == 0 and len(batches) >= 3
    for b0, b1 in batches:  # no batch overlapped the measurement
        assert b1 <= t_in or b0 >= t_out, (b0, b1, t_in, t_out)
    assert any(b0 >= t_out for b0, _ in batches)  # the trainer went on afterwards
    gate.close()


def _train_batches(folder, started, events):
    from onnxconet.latency.gate import MeasureGate

    gate = MeasureGate(folder)
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        with gate.shared():
            started.set()
            b0 = time.monotonic()
            time.sleep(0.1)  # a batch
            events.put((b0, time.monotonic()))


def test_a_proposal_sees_the_finished_trials_in_the_order_they_finished(tmp_path):
    """A worker rebuilds its strategy from the study: told every finished trial (in order), none twice."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(open_storage(url), "order", meta(4))
    w = StudyWorker(study, Pick(), Quick(0.0), 4, tmp_path, heartbeat=5)
    w.run()
    records = [t.user_attrs["record"] for t in sorted(study.get_trials(), key=lambda t: t.datetime_complete)]
    assert [r["told_before"] for r in records] == [0, 1, 2, 3]  # trial k was told after the k before it
    assert w.pristine.told == []  # the pristine strategy is never told anything itself
    rebuilt = w.rebuilt(study.get_trials())
    assert rebuilt.told == [r["trial"] for r in records]


def test_a_silent_worker_trial_is_failed_and_run_again_on_the_journal(tmp_path):
    """The journal storage has no engine heartbeat: the workers' own beat rule fails a trial silent for three
    beats and enqueues its copy, which the next worker runs before any new trial."""
    url = f"journal:{tmp_path / 'study.log'}"
    study = create_study(open_storage(url), "journal", meta(2))
    dead = study.ask()
    dead.set_user_attr("widths", {"0": 123})
    study._storage.set_trial_system_attr(dead._trial_id, "beat", time.time())
    fail_stale(study, interval=0.2)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]  # beating
    time.sleep(0.8)  # silent for more than three beats
    fail_stale(study, interval=0.2)
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL" and trials[1].state.name == "WAITING"
    assert trials[1].user_attrs["widths"] == {"0": 123}
    fail_stale(study, interval=0.2)  # a second look changes nothing (only running trials are judged)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]
    ev = Quick(0.0)
    StudyWorker(study, Pick(), ev, 2, tmp_path, heartbeat=1).run()
    assert ev.ran[0] == (1, {0: 123})  # the retry first, its widths as the dead worker had them
    counts = accounting(study.get_trials())
    assert counts == {"finished": 2, "running": 0, "waiting": 0, "lost": 1, "surplus": 0}


def test_a_trial_claimed_by_a_worker_that_dies_at_once_is_retried(tmp_path):
    """SQLite with the engine's heartbeat (1 s): a claim beats at once, so a worker that dies before its first
    training step is seen (Optuna never fails a trial that never beat) and its widths run again."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(open_storage(url, heartbeat=1), "early", meta(1))
    dead = StudyWorker(study, Pick(), Quick(0.0), 1, tmp_path, heartbeat=1)
    ot, widths = dead.claim(study.get_trials(), 0)  # ... and nothing more from it
    fail_stale(study, 1)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]  # not yet stale
    time.sleep(4.5)  # the grace period (three beats), and SQLite keeps whole seconds
    fail_stale(study, 1)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]
    ev = Quick(0.0)
    StudyWorker(study, Pick(), ev, 1, tmp_path, heartbeat=1).run()
    assert ev.ran == [(1, widths)]
    assert accounting(study.get_trials())["lost"] == 1


def test_a_beating_trial_is_not_failed(tmp_path):
    url = f"journal:{tmp_path / 'study.log'}"
    study = create_study(open_storage(url), "alive", meta(1))
    alive = study.ask()
    study._storage.set_trial_system_attr(alive._trial_id, "beat", time.time())
    fail_stale(study, interval=1.0)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]


def test_anneal_moves_off_the_start_that_another_worker_trains(grouped_space):
    space, cost = grouped_space
    init = cost.rescale(space.full(), 0.5)
    s = AnnealStrategy(space, Objective(0.5), cost, init, seed=0)
    assert s.ask() == init  # alone: the start
    s.running = [init]
    assert s.ask() != init  # the start is trained elsewhere: a move from it


def test_a_recorded_decision_is_replayed_not_decided_again(grouped_space):
    """anneal told a recorded trial follows its recorded acceptance (another worker decided it against the state
    of its time); a new trial is decided by Metropolis."""
    space, cost = grouped_space
    init = cost.rescale(space.full(), 0.5)
    s = AnnealStrategy(space, Objective(0.5), cost, init, seed=0)
    good = Trial(0, init, TrialState.COMPLETE, accuracy=0.9, ratio=0.4)
    assert s.tell(good)["accepted"]
    better = Trial(1, init, TrialState.COMPLETE, accuracy=0.95, ratio=0.4)
    assert not s.tell(Trial.from_json({**better.to_json(), "accepted": False}))["accepted"]
    assert s.current is good  # the recorded rejection stands although the objective is higher
    assert s.tell(Trial(2, init, TrialState.COMPLETE, accuracy=0.97, ratio=0.4))["accepted"]


def test_storage_errors_are_one_line_and_passwords_stay_out(tmp_path):
    from onnxconet.errors import OnnxconetError

    with pytest.raises(OnnxconetError, match="not a storage URL"):
        open_storage("redis://localhost/0")
    assert redact("postgresql://me:s3cret@db/x") == "postgresql://me:***@db/x"
    with pytest.raises(OnnxconetError) as e:
        open_storage("postgresql+psycopg2://me:s3cret@127.0.0.1:1/x")  # nothing listens on port 1
    assert "s3cret" not in str(e.value) and "cannot open" in str(e.value) and "\n" not in str(e.value)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    assert existing(storage, "x", resume=False) is None  # new
    create_study(storage, "x", meta(1))
    with pytest.raises(OnnxconetError, match="already exists.*--resume"):
        existing(storage, "x", resume=False)
    assert existing(storage, "x", resume=True, fingerprint="f").trials == 1
    with pytest.raises(OnnxconetError, match="another model"):
        existing(storage, "x", resume=True, fingerprint="g")
    # passwords SQLAlchemy would read, however written
    assert "ab/cd" not in redact("postgresql://me:ab/cd@db/x") and "pw" not in redact("postgresql://:pw@db/x")


@pytest.fixture(scope="module")
def postgres():
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: run tools/install_services.sh")
    with loopback_postgres() as url:
        yield url


# the kill test runs on PostgreSQL by default (the server tools/install_services.sh installs); on SQLite with -m slow
# (50 s: the default run's 15 minutes; SQLite's study is exercised by the other tests here)
@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.slow), "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres")


def test_a_worker_killed_mid_trial_costs_nothing(tmp_path, npz_data, storage_url):
    """`search --workers 2` of 6 trials; the second worker is SIGKILLed while it trains: the study still finishes
    6 trials, the killed one is failed by the heartbeat and its widths run again under another number, and
    history.jsonl / result.json account for it."""
    study_name = f"kill-{tmp_path.name}"[-60:]
    out = tmp_path / "run"
    args = [sys.executable, "-m", "onnxconet", "search",
            *tiny_search_args(npz_data, trials=6), "--epochs-per-trial", "12", "--workers", "2",
            "--storage", storage_url, "--study", study_name, "--heartbeat", "1", "--torch-threads", "1",
            "--out", str(out), "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        killed = _kill_the_other_worker(storage_url, study_name, proc.pid, deadline=time.monotonic() + 150)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads(stdout)
    study = optuna.load_study(storage=open_storage(storage_url), study_name=study_name)
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state.name == "FAIL"  # the engine's heartbeat failed it
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["widths"] == by_number[killed].user_attrs["widths"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()[1:]]
    numbers = [r["trial"] for r in history]
    assert len(numbers) == 6 == len(set(numbers)) and killed not in numbers and retry[0].number in numbers
    assert result["study"]["finished"] == 6 and result["study"]["lost"] == 1
    assert (out / "best.onnx").is_file() and result["best"]["budget_met"]


def _kill_the_other_worker(url: str, name: str, coordinator: int, deadline: float) -> int:
    """SIGKILL the first worker process (not the coordinator) seen running a trial; returns that trial's number."""
    storage = None
    while time.monotonic() < deadline:
        try:
            storage = storage or open_storage(url)
            study = optuna.load_study(storage=storage, study_name=name)
        except Exception:  # noqa: BLE001 - not created yet
            time.sleep(0.2)
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker", "")
            pid = int(worker.rsplit(":", 1)[1]) if ":" in worker else None
            if pid and pid != coordinator and "widths" in t.user_attrs:
                time.sleep(0.3)  # in its training
                os.kill(pid, signal.SIGKILL)
                return t.number
        time.sleep(0.1)
    raise AssertionError("the second worker never ran a trial")


@pytest.fixture
def grouped_space():
    from onnxconet.prepare import prepare
    from onnxconet.search.cost import CostModel
    from onnxconet.space import WidthSpace
    from tests.conftest import MIX

    cg = prepare(MIX, None, None).graph
    space = WidthSpace(cg, min_ratio=0.25)
    return space, CostModel(cg, space, "flops")


def test_worker_cli_says_what_is_missing_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from onnxconet.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["worker", "--study", "s"], env={"ONNXCONET_STORAGE": ""})
    assert r.exit_code == 2 and "--storage" in r.output
    url = f"sqlite:///{tmp_path / 'study.db'}"
    r = runner.invoke(app, ["worker", "--storage", url, "--study", "nope", "--wait", "0"])
    assert r.exit_code == 1 and "no study 'nope'" in r.output and "--wait" in r.output
    meta_ = meta(1)
    meta_.out = str(tmp_path / "gone")  # a run folder this machine does not see
    create_study(open_storage(url), "far", meta_)
    r = runner.invoke(app, ["worker", "--storage", url, "--study", "far", "--wait", "0"])
    assert r.exit_code == 1 and "baseline.onnx is missing" in r.output and "--out" in r.output


def test_workers_started_early_end_when_the_run_fails_before_publishing(tmp_path, npz_data):
    """`search --workers 2` starts its second worker before preparing (its imports overlap the preparation); a
    run that fails while preparing (an unreachable budget) ends it at once, not after its hour of --wait."""
    from onnxconet.commands.search import run_search
    from onnxconet.errors import OnnxconetError
    from tests.conftest import search_cfg

    cfg = search_cfg(tmp_path, npz_data, workers=2, budget="0.01", pretrain_epochs=0)
    t0 = time.monotonic()
    with pytest.raises(OnnxconetError, match="budget"):
        run_search(cfg)
    assert time.monotonic() - t0 < 120
    log = (tmp_path / "run" / "worker-1.log").read_text()
    assert "stopped before publishing its study" in log, log


def test_a_stopped_run_on_a_study_says_how_many_trials_finished(tmp_path):
    """The last line of an interrupted `search --workers` names the study's finished trials (its history.jsonl is
    only written at the end), or that the study was never published."""
    from onnxconet.search.config import SearchConfig
    from onnxconet.search.parallel import where_on_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = SearchConfig(out=str(tmp_path / "run"), storage=url, study="s", trials=5, workers=2)
    assert where_on_study(cfg) == "before its study 's' was published"
    create_study(open_storage(url), "s", meta(5))
    study = optuna.load_study(storage=open_storage(url), study_name="s")
    StudyWorker(study, Pick(), Quick(), 2, tmp_path, heartbeat=5, poll=0.05).run()
    assert where_on_study(cfg) == "with 2 of 5 trials finished in study 's'"
