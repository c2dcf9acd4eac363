"""The search loop: history (append-only JSONL, resumable), checkpoints, failure handling, progress.

Directory layout of a run (`--out`):
    .lock              the pid of the run writing the folder (files.RunLock); empty when none is
    history.jsonl      header line (config, fingerprint) + one line per finished trial
    teacher.pt         the pretrained original (when no --weights were given)
    bank.pt            the full-width weight bank after the last accepted trial ({"after_trial": n, "bank": ...})
    bank.next.pt       an accepted trial's bank, written before its history line, renamed to bank.pt after it
    best_candidate.pt  the best feasible trial's fine-tuned weights and keep mask
    baseline.onnx, best.onnx, best_widths.json, result.json, report.md, pareto.png

A killed run resumes with --resume: the strategy is replayed from the history (asked again, told the
recorded results, nothing retrained), the bank is reloaded, and the loop continues at the next trial.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onnxconet import faults
from onnxconet.errors import OnnxconetError
from onnxconet.files import append_jsonl, atomic_save
from onnxconet.search.base import Objective, Strategy, Trial, TrialState
from onnxconet.search.evaluate import Evaluator, failed_trial
from onnxconet.surgery.inherit import WeightBank

log = logging.getLogger(__name__)
BANK, BANK_NEXT = "bank.pt", "bank.next.pt"
Progress = Callable[[str, dict], None]


class History:
    """Append-only JSONL: a header and one record per finished trial; each line is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def read(self) -> tuple[dict | None, list[dict]]:
        header, trials = None, []
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning(
                    "%s:%d: skipped a truncated line (the run was killed while writing it)", self.path, i
                )
                continue
            if rec.get("kind") == "header":
                header = rec
            elif rec.get("kind") == "trial":
                trials.append(rec)
        return header, trials

    def append(self, record: dict) -> None:
        append_jsonl(self.path, record)


@dataclass
class Loop:
    """Runs `trials` trials of `strategy` with `evaluator`, recording into `out`."""

    strategy: Strategy
    evaluator: Evaluator
    objective: Objective
    out: Path
    trials: int
    on_observe: Callable[[Trial], None] | None = None
    progress: Progress | None = None
    absorb: bool = True  # write accepted trials back into the bank (False: every trial is cut afresh)

    def __post_init__(self) -> None:
        self.history = History(self.out / "history.jsonl")
        self.records: list[dict] = []
        self.best: Trial | None = None

    def _emit(self, event: str, data: dict) -> None:
        if self.progress:
            self.progress(event, data)

    def _consider_best(self, trial: Trial) -> bool:
        if not self.objective.feasible(trial):
            return False
        if self.best is None or self.objective(trial) > self.objective(self.best):
            self.best = trial
            return True
        return False

    def replay(self, records: list[dict]) -> None:
        """Bring the strategy to where the recorded run stopped, without training."""
        for rec in records:
            trial = Trial.from_json(rec)
            asked = self.strategy.ask()
            if asked != trial.widths:
                log.warning(
                    "resume: trial %d was recorded with other widths than the strategy now proposes "
                    "(code or config changed?); continuing with the recorded result",
                    trial.number,
                )
            if self.on_observe:
                self.on_observe(trial)
            self.strategy.tell(trial)
            self._consider_best(trial)
            self.records.append(rec)
        if records:
            self._emit("stage", {"text": f"resumed after {len(records)} finished trials"})

    def load(self, records: list[dict]) -> None:
        """Take the finished trials of a shared study, in the order they finished, without asking for them (each
        worker proposed its own, search/workers.py): the strategy is told them as the workers told it."""
        for rec in records:
            trial = Trial.from_json(rec)
            if self.on_observe:
                self.on_observe(trial)
            self.strategy.reseed(trial.number, 1)
            self.strategy.tell(trial)
            self._consider_best(trial)
            self.records.append(rec)

    def _record(self, n: int, widths, trial: Trial, model, slices, absorb: bool) -> dict:
        """Tell the strategy a finished trial; write best_candidate.pt (a new best) and, for an accepted trial
        absorbed into the bank, the bank as bank.next.pt; then its history line, which commits the trial; then
        bank.next.pt becomes bank.pt. A kill anywhere in between leaves files that `restore_bank` sorts out."""
        if self.on_observe:
            self.on_observe(trial)
        facts = self.strategy.tell(trial)
        is_best = self._consider_best(trial)
        if is_best and model is not None:
            keep = self.evaluator.cg.keep_mask(widths, self.evaluator.bank.scores(self.evaluator.cg))
            atomic_save(
                {"trial": n, "state": model.state_dict(), "keep": torch.from_numpy(keep)},
                self.out / "best_candidate.pt",
            )
        banked = bool(facts.get("accepted") and absorb and model is not None)
        if banked:
            self.evaluator.bank.absorb(slices, model)
            atomic_save({"after_trial": n, "bank": self.evaluator.bank.state_dict()}, self.out / BANK_NEXT)
        rec = {"kind": "trial", **trial.to_json(), **facts}
        self.history.append(rec)
        faults.point("history written")
        self.records.append(rec)
        if banked:
            os.replace(self.out / BANK_NEXT, self.out / BANK)
        return rec

    def run(self) -> None:
        absorb = self.absorb and self.strategy.absorb
        for n in range(len(self.records), self.trials):
            widths = self.strategy.ask()
            if widths is None:
                self._emit(
                    "stage",
                    {"text": f"{self.strategy.name}: no configuration left that no trial has trained; "
                     f"the search stops after {n} of {self.trials} trials"},
                )  # fmt: skip
                break
            self._emit("trial_start", {"trial": n, "trials": self.trials, "widths": widths})
            with faults.phase(f"trial {n}"):
                self._trial(n, widths, absorb)

    def _trial(self, n: int, widths, absorb: bool) -> None:
        """Train, record and report trial `n` (a failing candidate is recorded as failed, not raised)."""
        try:
            trial, model, slices = self.evaluator.run(n, widths)
        except (KeyboardInterrupt, OnnxconetError) as e:
            if isinstance(e, KeyboardInterrupt) or "NaN" not in str(e) and "nan" not in str(e):
                raise
            trial, model, slices = failed_trial(n, widths, e, 0.0), None, None
        except Exception as e:  # noqa: BLE001 - a failing candidate must not end the search
            trial, model, slices = failed_trial(n, widths, e, 0.0), None, None
        with ctrl_c_after():  # Ctrl-C waits for the trial's checkpoint, history line and bank.pt
            rec = self._record(n, widths, trial, model, slices, absorb)
        self._emit(
            "trial_end",
            {
                "record": rec,
                "best": self.best.number if self.best else None,
                "best_accuracy": self.best.accuracy if self.best else None,
            },
        )


@contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block takes effect when it ends: a resumed run then finds a history that
    agrees with the checkpoints. Outside the main thread (no signal handlers there) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        log.warning("%s is unreadable (%s); ignoring it", path, str(e).splitlines()[0][:120])
        return None


def restore_bank(bank: WeightBank, out: Path, records: list[dict]) -> bool:
    """Load the bank of the last committed trial: bank.next.pt when its trial reached the history (killed before
    it was renamed to bank.pt), else bank.pt; a bank.next.pt of a trial the history lacks is dropped (that trial
    is run again). Returns whether a bank was loaded."""
    done = {r.get("trial") for r in records}
    pending = out / BANK_NEXT
    if pending.is_file():
        state = load_checkpoint(pending)
        if state is not None and state.get("after_trial") in done:
            os.replace(pending, out / BANK)
        else:
            pending.unlink()
    state = load_checkpoint(out / BANK)
    if state is None:
        return False
    # a bank.pt written before bank.next.pt existed holds the bare bank
    bank.load_state_dict(state["bank"] if "after_trial" in state else state)
    return True


def keep_of(best_ckpt: dict | None, trial: Trial) -> np.ndarray | None:
    if best_ckpt is None or best_ckpt.get("trial") != trial.number:
        return None
    return best_ckpt["keep"].numpy().astype(bool)


def trial_state_ok(rec: dict) -> bool:
    return rec.get("state") == TrialState.COMPLETE.value
