"""Search workers on a shared study (search/study.py): claim a trial, train and measure it, record it; until the
study holds its number of finished trials.

A worker proposes from the study, not from its own memory: before each claim it rebuilds its strategy from a
pristine copy told every finished trial in the order they finished (as `--resume` replays history.jsonl), and
asks it for the trial's widths with the RNG keyed by the trial's number; the widths of trials still running
elsewhere are shown to the strategy (`Strategy.running`), so two workers starting together do not both train
anneal's start. When its trial ends the worker rebuilds again and tells it: anneal's Metropolis rule is applied
on completion against the state accepted by then (asynchronous annealing).

Exactly `trials` trials finish: a claim that would make more than that (two workers racing for the last trial)
is failed at once and marked `surplus`; a trial whose worker died is failed by the heartbeat and enqueued again
(its copy is claimed before any new trial). Trials are cut from the original and never written back into a
shared weight bank (what `--final-from trial` does on one worker): the best trial's fine-tuned weights are kept
in candidates/trial-N.pt for the final fine-tune.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from onnxconet.errors import OnnxconetError
from onnxconet.files import atomic_save
from onnxconet.search.base import Objective, Strategy, Trial
from onnxconet.search.evaluate import Evaluator, failed_trial
from onnxconet.search.study import finished, objective_value

log = logging.getLogger(__name__)
CANDIDATES = "candidates"
Progress = Callable[[str, dict], None]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StudyWorker:
    """One worker's loop (module docstring). `strategy` is the pristine strategy (never told anything); the
    evaluator trains and measures; `out` is the run folder shared by the workers."""

    def __init__(
        self,
        study,
        strategy: Strategy,
        evaluator: Evaluator,
        trials: int,
        out: Path,
        heartbeat: float = 10.0,
        progress: Progress | None = None,
        poll: float = 1.0,
    ) -> None:
        self.study, self.pristine, self.evaluator, self.trials = study, strategy, evaluator, trials
        self.out, self.heartbeat, self.progress, self.poll = Path(out), heartbeat, progress, poll
        self.objective: Objective = strategy.objective
        self.ran: list[int] = []
        self.name = worker_name()

    def _emit(self, event: str, data: dict) -> None:
        if self.progress:
            self.progress(event, data)

    def rebuilt(self, all_trials) -> Strategy:
        """The pristine strategy told every finished trial, in the order they finished."""
        cg = getattr(getattr(self.pristine, "cost", None), "cg", None)
        strategy = copy.deepcopy(self.pristine, memo={id(cg): cg} if cg is not None else None)
        cost = getattr(strategy, "cost", None)
        for t in finished(all_trials):
            trial = Trial.from_json(t.user_attrs["record"])
            if cost is not None:
                cost.observe_trial(trial)
            strategy.reseed(trial.number, 1)
            strategy.tell(trial)
        return strategy

    def run(self) -> list[int]:
        """Claim and run trials until the study holds `trials` finished ones; returns the numbers this worker
        ran."""
        while True:
            fail_stale(self.study, self.heartbeat)
            all_trials = self.study.get_trials(deepcopy=False)
            done = sum(t.state.name == "COMPLETE" for t in all_trials)
            if done >= self.trials:
                return self.ran
            claim = self.claim(all_trials, done)
            if claim is None:  # the last trials run elsewhere: wait for them (or for their retries)
                time.sleep(self.poll)
                continue
            self.run_trial(*claim)

    def claim(self, all_trials, done: int):
        """(optuna trial, widths) of the next trial this worker runs, or None when none is left to claim."""
        live = [t for t in all_trials if t.state.name in ("RUNNING", "WAITING")]
        waiting = any(t.state.name == "WAITING" for t in live)
        if done + len(live) >= self.trials and not waiting:
            return None
        ot = self.study.ask()  # a waiting retry first (Optuna pops it atomically), else a new trial
        beat_now(self.study, ot)  # from now on a death is seen (a trial never beaten is never failed)
        now = self.study.get_trials(deepcopy=False)
        active = sorted(
            t.number
            for t in now
            if t.state.name in ("COMPLETE", "RUNNING", "WAITING") or t.number == ot.number
        )
        if active.index(ot.number) >= self.trials:
            ot.set_user_attr("surplus", True)
            self.study.tell(ot, state=_optuna_state("FAIL"))
            return None
        widths = ot.user_attrs.get("widths")
        if widths is not None:  # a retry of a trial whose worker died
            widths = {int(k): int(v) for k, v in widths.items()}
            self._emit("stage", {"text": f"trial {ot.number}: retrying the widths of a lost worker's trial"})
        else:
            strategy = self.rebuilt(now)
            strategy.running = [
                {int(k): int(v) for k, v in t.user_attrs["widths"].items()}
                for t in now
                if t.state.name == "RUNNING" and t.number != ot.number and "widths" in t.user_attrs
            ]
            strategy.reseed(ot.number, 0)
            widths = strategy.ask()
            ot.set_user_attr("widths", {str(k): int(v) for k, v in widths.items()})
        ot.set_user_attr("worker", self.name)
        return ot, widths

    def run_trial(self, ot, widths: dict[int, int]) -> None:
        n = ot.number
        self._emit("trial_start", {"trial": n, "trials": self.trials, "widths": widths})
        with beating(self.study, ot, self.heartbeat):
            trial, model = self._evaluate(n, widths)
            strategy = self.rebuilt(self.study.get_trials(deepcopy=False))
            strategy.reseed(n, 1)
            facts = strategy.tell(trial)
            rec = {"kind": "trial", **trial.to_json(), **facts, "worker": self.name}
            if model is not None and self._is_best(trial):
                keep = self.evaluator.cg.keep_mask(widths, self.evaluator.bank.scores(self.evaluator.cg))
                atomic_save(
                    {"trial": n, "state": model.state_dict(), "keep": torch.from_numpy(keep)},
                    self.out / CANDIDATES / f"trial-{n}.pt",
                )
            try:
                ot.set_user_attr("record", rec)
                self.study.tell(ot, objective_value(self.objective(trial)))
            except (RuntimeError, ValueError) as e:  # UpdateFinishedTrialError is a RuntimeError
                # failed meanwhile by another worker (beats lost): its copy is run again; this result is dropped
                log.warning("trial %d was failed meanwhile (%s); its retry counts instead", n, str(e)[:120])
                return
        self.ran.append(n)
        self._emit("trial_end", {"record": rec, "best": None, "best_accuracy": None})

    def _evaluate(self, n: int, widths: dict[int, int]):
        try:
            trial, model, _slices = self.evaluator.run(n, widths)
            return trial, model
        except KeyboardInterrupt:
            raise
        except OnnxconetError as e:
            if "nan" not in str(e).lower():
                raise
            return failed_trial(n, widths, e, 0.0), None
        except Exception as e:  # noqa: BLE001 - a failing candidate must not end the search
            return failed_trial(n, widths, e, 0.0), None

    def _is_best(self, trial: Trial) -> bool:
        if not self.objective.feasible(trial):
            return False
        j = self.objective(trial)
        for t in finished(self.study.get_trials(deepcopy=False)):
            other = Trial.from_json(t.user_attrs["record"])
            if self.objective.feasible(other) and self.objective(other) >= j:
                return False
        return True


def _engine_heartbeat(study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def _optuna_state(name: str):
    import optuna

    return getattr(optuna.trial.TrialState, name)


def beat_now(study, ot) -> None:
    """One heartbeat of `ot` now (the engine's, or the journal's `beat` attribute: a retry carries its dead
    worker's last beat, which must not fail it again at once)."""
    if _engine_heartbeat(study):
        study._storage.record_heartbeat(ot._trial_id)
    else:
        study._storage.set_trial_system_attr(ot._trial_id, "beat", time.time())


@contextmanager
def beating(study, ot, interval: float) -> Iterator[None]:
    """Keep `ot` alive while the block runs: a beat every `interval` seconds from a thread (`beat_now`). A beat
    that fails (the database restarting, a dropped connection) is tried again at the next one; Optuna's own
    heartbeat thread stops at the first error, and its trial is then failed under a living worker."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                beat_now(study, ot)
            except Exception as e:  # noqa: BLE001 - transient: the next beat tries again
                log.warning("trial %d: a heartbeat failed (%s); trying again", ot.number, str(e)[:120])

    thread = threading.Thread(target=beat, daemon=True, name="onnxconet-beat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale(study, interval: float) -> None:
    """Fail the running trials whose worker stopped beating (three missed beats) and enqueue a copy of each:
    Optuna's `fail_stale_trials` on SQL storages, the same rule on the "beat" attribute elsewhere. A claim that
    never beat (its worker died between asking and its first beat) is failed by the same rule on its start."""
    import optuna

    storage = study._storage
    engine = _engine_heartbeat(study)
    if engine:
        optuna.storages.fail_stale_trials(study)
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if engine:
            if "worker" in t.user_attrs:  # claimed and beating: the engine's rule above
                continue
            last = started
        else:
            last = max(t.system_attrs.get("beat") or started, started)
        if now - last <= 3 * interval:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
                retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first


def best_candidate(out: Path, trial: Trial | None) -> None:
    """Move the shipped trial's weights (if its worker kept them) to best_candidate.pt, where the final
    fine-tune looks; drop the others."""
    folder = Path(out) / CANDIDATES
    if not folder.is_dir():
        return
    if trial is not None and (folder / f"trial-{trial.number}.pt").is_file():
        os.replace(folder / f"trial-{trial.number}.pt", Path(out) / "best_candidate.pt")
    for f in folder.glob("trial-*.pt"):
        f.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
