"""The strategy interface (ask for widths, be told the finished trial) and the trial record.

Strategies see history only as frozen `Trial` records and own a seeded RNG, so a run replays exactly:
resuming asks the strategy again and tells it the recorded results, without training anything.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxconet.space import WidthSpace


class TrialState(str, enum.Enum):
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class Trial:
    """One evaluated width configuration. `ratio` is the budgeted quantity's ratio to the baseline
    (measured latency, FLOPs or params); `metrics` are per-group layer metrics (CONetV2's QC)."""

    number: int
    widths: dict[int, int]
    state: TrialState
    accuracy: float | None = None
    ratio: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    params: int = 0
    flops: int = 0
    flops_ratio: float = 1.0
    params_ratio: float = 1.0
    seconds: float = 0.0
    metrics: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["trial"] = d.pop("number")
        d["state"] = self.state.value
        d["widths"] = {str(k): int(v) for k, v in self.widths.items()}
        d["metrics"] = {str(k): float(v) for k, v in self.metrics.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Trial:
        d = dict(d)
        d["number"] = d.pop("trial")
        d["state"] = TrialState(d["state"])
        d["widths"] = {int(k): int(v) for k, v in d["widths"].items()}
        d["metrics"] = {int(k): float(v) for k, v in d.get("metrics", {}).items()}
        known = set(cls.__dataclass_fields__)
        extra = {k: v for k, v in d.items() if k not in known}
        d = {k: v for k, v in d.items() if k in known}
        d["extra"] = {**d.get("extra", {}), **extra}  # a new dict: the caller's record stays as it was
        return cls(**d)


@dataclass(frozen=True)
class Objective:
    """J = accuracy - penalty * max(0, ratio / budget - 1): a hinge on the budget.

    Below the budget only accuracy counts (wider is naturally more accurate, so the search is pulled up to the
    budget); above it every 1% of overshoot costs `penalty` percent of accuracy. A hinge keeps the
    objective's unit (accuracy) readable in the report, unlike FBNet's multiplicative log-latency form.
    """

    budget: float
    penalty: float = 1.0

    def __call__(self, trial: Trial) -> float:
        if trial.state is not TrialState.COMPLETE or trial.accuracy is None or trial.ratio is None:
            return -math.inf
        return trial.accuracy - self.penalty * max(0.0, trial.ratio / self.budget - 1.0)

    def feasible(self, trial: Trial, slack: float = 0.0) -> bool:
        return (
            trial.state is TrialState.COMPLETE
            and trial.ratio is not None
            and trial.ratio <= self.budget * (1 + slack)
        )


@dataclass
class Setup:
    """What a strategy's preparation changes for its trials; the run applies it (strategies never reach into
    the evaluator).

    Attributes:
        bank: the weights trials are cut from instead of the original's (dmasking: the trained supernet,
            in its staircase order).
        resolution: the input resolution trials are cut, trained and measured at (dmasking --resolutions;
            a `search.resolution.Resolution`).
    """

    bank: Any = None
    resolution: Any = None


class Strategy:
    """Base class: `ask()` returns the next widths (None: nothing new is left to try, and the run's trials stop
    there); `tell(trial)` reports its result and returns the facts the strategy wants recorded with it (kept
    apart from the trial's own fields in the history).

    Optional capabilities, declared here with their defaults so the run never probes for them:
        reinit: trials start from re-initialized weights (the `scratch` baseline), not the original's.
        searches: False for the uniform baselines: whatever they ship is their start (`best.shipped`).
        absorb: with --final-from trial, an accepted trial's fine-tuned weights go back into the bank.
        prepare(ctx, records): work before the first ask (dmasking trains its supernet); returns a `Setup`.
        anchor(): the widths the search started from, raced against its best at the end (search/race.py).
        summary(): extra result.json entries (dmasking: the supernet's summary and its logits' history).
    """

    name = "base"
    reinit: bool = False
    absorb: bool = True
    searches: bool = True
    # the widths of trials that other workers are running now (search/workers.py); empty on one worker
    running: list[dict[int, int]] = []

    def __init__(self, space: WidthSpace, objective: Objective, seed: int = 0) -> None:
        self.space = space
        self.objective = objective
        self.seed = seed

    def reseed(self, *key: int) -> None:
        """Key the strategy's RNG (if it has one) by `key` (a trial's number and phase): on a shared study the
        proposal and the acceptance of a trial do not depend on which worker made them or on what it did before
        (search/workers.py)."""
        if hasattr(self, "rng"):
            self.rng = np.random.default_rng([self.seed, *key])

    def prepare(self, ctx: Any, records: list[dict]) -> Setup:
        """Before the first ask. `ctx` is the run's `search.context.RunContext`; `records` the history's
        finished trials (non-empty when resuming). Default: nothing to prepare."""
        return Setup()

    def ask(self) -> dict[int, int] | None:
        raise NotImplementedError

    def tell(self, trial: Trial) -> dict[str, Any]:
        """Returns facts to record with the trial (e.g. accepted, temperature)."""
        return {}

    def anchor(self) -> dict[int, int] | None:
        """The widths the search started from, or None when it has no such start."""
        return None

    def as_deployed(self) -> dict[tuple, float]:
        """{`widths_key(widths)`: latency ratio} for widths the strategy measured as deployed before training,
        within the budget: their trials are judged by that figure (`Evaluator.as_deployed`). Default: none."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Extra entries for result.json."""
        return {}


def widths_key(widths: dict[int, int]) -> tuple:
    """A hashable key of a width configuration."""
    return tuple(sorted((int(g), int(w)) for g, w in widths.items()))
