"""The search's latency judge: candidates against the baseline, in-loop for every trial and as deployed for
every decision (see `onnxconet.latency.profile` for the two ways of measuring)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

import onnx

from onnxconet.latency.profile import PairedMeasurer, RelativeStats, Target, ci_room, measure_isolated

# the knapsack's in-loop target when a trial measured over the budget in-loop: the in-loop figure has no room of its
# own for the final check (two deployed measurements of one file differ by ~2.4 % (std) at 2 threads on the CI kind)
CONFIRM_MARGIN = 0.97

# the room (`room`) a deployed measurement that decides something (where a placement lies, which trial ships) may
# leave, as a share of the budget: pairs are added, pooled, while it is wider (`LatencyJudge.deployed(room=)`).
# One pair in a slow phase set rooms of 0.06-0.28 at a 0.5 budget on 2026-12-05 (the CI of under 11 pairs is their
# range) and the knapsack kept a placement at 0.33; measuring again alone drew another wide figure. Quiet
# measurements of ResNet-20 at 1 thread leave ~0.005-0.015 at 0.3
DECIDING_ROOM = 0.03


def fits(stats, budget: float) -> bool:
    """Whether a ratio measured as deployed (`LatencyJudge.deployed`) stays within `budget` when the same file is
    measured again (the final check): the ratio plus the width of its 95 % CI (`room`). Two medians' difference
    spreads ~1.4x the standard error and the CI's width is ~4x it, so the room is ~2.8 of those spreads (about 3
    in 1,000 re-measurements over). A figure without a CI is taken at its word. On a quiet machine at 1 thread the
    room is ~1-2 % of the ratio where the fixed `CONFIRM_MARGIN` took 3 % (at a 0.3 budget, placements measured at
    0.2915-0.297 were thrown away for a 0.291 target); on a VM whose speed flips between phases it is ~10-25 %
    (docs/measurements.md, "The room")."""
    return stats.ratio + room(stats) <= budget


def deciding(judge, candidate, budget: float) -> RelativeStats:
    """`candidate` as deployed for a decision under `budget` (where a placement lies, which trial ships): pairs
    added while the room it leaves (`room`) is over `DECIDING_ROOM` of the budget (`LatencyJudge.deployed`)."""
    return judge.deployed(candidate, room=DECIDING_ROOM * budget)


def room(stats) -> float:
    """The room `fits` leaves above a ratio measured as deployed: the width of its 95 % CI, at least twice the
    CI's upper end over the ratio (`latency.profile.ci_room`; 0 without a CI)."""
    return ci_room(stats.ratio, getattr(stats, "ratio_ci", None))


class LatencyJudge:
    """Latency of candidates relative to the baseline ONNX, at the deployment's target.

    `measure` is the in-loop estimate every trial takes: a `PairedMeasurer` whose runner processes hold the
    baseline for the whole search (started on first use); a measurement that other programs disturbed is taken
    again (up to twice; the median of what was taken). `reference_ms` keeps the baseline's latency measured
    beside every candidate: when it moves, the machine's speed changed during the search (see `drift`).
    `deployed` is the ratio as deployed (`measure_isolated`: each model alone in fresh processes, pairs added up
    to twice `pairs` while they disagree), for the decisions a search takes on one figure: whether the budget
    is reachable, which trial to finish, whether the result met the budget.
    """

    def __init__(self, reference: bytes | str, target: Target, max_seconds: float = 2.0, pairs: int = 4):
        self.reference, self.target, self.max_seconds, self.pairs = reference, target, max_seconds, pairs
        self._measurer: PairedMeasurer | None = None
        self.reference_ms: list[float] = []
        # with several workers on this machine: measure alone, the others' training paused (latency/gate.py)
        self.gate = None

    def alone(self):
        """Around a measurement: this machine's other workers paused (a no-op without `gate`)."""
        return self.gate.exclusive() if self.gate is not None else nullcontext()

    @property
    def measurer(self) -> PairedMeasurer:
        if self._measurer is None:
            self._measurer = PairedMeasurer(self.reference, self.target)
        return self._measurer

    def measure(self, candidate: onnx.ModelProto | bytes) -> tuple[float, float]:
        """(ratio to the baseline, candidate median ms), the in-loop way."""
        src = candidate.SerializeToString() if isinstance(candidate, onnx.ModelProto) else candidate
        with self.alone():
            rel = _undisturbed(lambda: self.measurer.compare(src, max_seconds=self.max_seconds))
        self.reference_ms.append(rel.reference.median_ms)
        return rel.ratio, rel.candidate.median_ms

    def drift(self) -> dict | None:
        """How far the baseline's own latency moved over the in-loop measurements: {"min_ms", "max_ms",
        "spread" (max / min - 1), "measurements"}, or None before two measurements."""
        if len(self.reference_ms) < 2:
            return None
        lo, hi = min(self.reference_ms), max(self.reference_ms)
        return {"min_ms": lo, "max_ms": hi, "spread": hi / lo - 1, "measurements": len(self.reference_ms)}

    def deployed(
        self, candidate, threads: int | None = None, pairs: int | None = None, room: float | None = None
    ) -> RelativeStats:
        """The ratio as deployed (`measure_isolated`, `pairs` pairs, default the judge's) of `candidate` (a proto,
        bytes or path); `threads` overrides the target's thread count. `room`: pairs are added, up to 4 x `pairs`,
        while the room `fits` would leave exceeds it (a decision that steers by the figure needs it narrow; pooled
        pairs outvote one caught in a slow phase, where measuring again alone drew another wide figure).
        Disturbed (other programs took the cores): measured again, up to twice, and the median of what was
        measured returned."""
        pairs = pairs or self.pairs
        target = self.target if threads is None else replace(self.target, threads=threads)
        src = candidate.SerializeToString() if isinstance(candidate, onnx.ModelProto) else candidate
        seconds = max(0.25, self.max_seconds / 4)  # per process: 0.5 s at the default 2 s
        kw = dict(pairs=pairs, max_pairs=2 * pairs, seconds=seconds)
        if room is not None:
            kw |= dict(max_pairs=4 * pairs, max_room=room)
        with self.alone():
            return _undisturbed(lambda: measure_isolated(src, self.reference, target, **kw))

    def close(self) -> None:
        if self._measurer is not None:
            self._measurer.close()
            self._measurer = None


def _undisturbed(measure: Callable[[], RelativeStats], tries: int = 3) -> RelativeStats:
    """`measure()`, again while other programs disturbed it (up to `tries` in all); the run with the median
    ratio of those taken."""
    runs = [measure()]
    while runs[-1].disturbed and len(runs) < tries:
        runs.append(measure())
    return sorted(runs, key=lambda r: r.ratio)[len(runs) // 2]
