"""dmasking's phase 2: one candidate per ask, derived from the trained supernet's distributions and put on the
budget (package docstring: argmax, expected width, then samples).

Apart from the strategy because deriving is arithmetic on the final logits that needs no run: given the
logits, the grid, a cost and an RNG it always gives the same widths, which is what a resumed run relies on
when it replays its trials. The one thing measured, a latency candidate's check before it is handed out, goes
through `Checks`, cached in the run directory so that a replay measures nothing and asks the same widths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from onnxconet.files import atomic_write
from onnxconet.graph.groups import ChannelGraph
from onnxconet.search.cost import scale_onto
from onnxconet.search.dmasking.cost import DMaskingCost
from onnxconet.search.dmasking.supernet import SupernetResult
from onnxconet.space import WidthSpace
from onnxconet.surgery.onnx import slice_onnx

log = logging.getLogger(__name__)
CHECKS = "dmasking_checks.json"
SPAN = (-5.0, 5.0, 24)  # log2 of the one scale factor: bisection over [-5, 5] in 24 halvings
RETRIES = 20  # draws of a sample while it repeats a configuration already asked


def snap(grid: Mapping[int, list[int]], widths: Mapping[int, float]) -> dict[int, int]:
    """Every group's width to the nearest value of its grid (groups without a grid: truncated)."""
    return {g: _snap_one(grid.get(g), w) for g, w in widths.items()}


def _snap_one(grid: list[int] | None, w: float) -> int:
    if not grid:
        return int(w)
    return int(grid[int(np.argmin([abs(v - w) for v in grid]))])


def probs_at(logits: Mapping[int, np.ndarray], tau: float) -> dict[int, np.ndarray]:
    """softmax(α / τ) per group, in numpy (the supernet's distributions at temperature τ)."""
    out = {}
    for gid, a in logits.items():
        z = a / tau
        e = np.exp(z - z.max())
        out[gid] = e / e.sum()
    return out


class Checks:
    """Measured latency ratios of derived candidates by widths, cached in `path` (read back when the run
    resumes, so a replay asks the same widths without measuring)."""

    def __init__(self, measure: Callable[[dict[int, int]], float], path: Path | None, resume: bool) -> None:
        self.measure, self.path, self.resume = measure, path, resume
        self._cache: dict[str, float] | None = None

    def ratio(self, widths: Mapping[int, int]) -> float:
        if self._cache is None:
            self._cache = {}
            if self.path is not None and self.path.is_file() and self.resume:
                try:
                    self._cache = json.loads(self.path.read_text())
                except ValueError:
                    log.warning("%s is unreadable; measuring again", self.path)
        key = json.dumps(sorted((int(g), int(w)) for g, w in widths.items()))
        if key not in self._cache:
            self._cache[key] = float(self.measure(dict(widths)))
            if self.path is not None:
                atomic_write(self.path, json.dumps(self._cache))
        return self._cache[key]


def judged(judge, cg: ChannelGraph, scores: np.ndarray) -> Callable[[dict[int, int]], float]:
    """widths -> their latency ratio as the run's judge measures it in-loop, cut from `cg` keeping channels in
    the order of `scores` (the supernet's staircase)."""

    def measure(widths: dict[int, int]) -> float:
        keep = cg.keep_mask(widths, scores)
        return float(judge.measure(slice_onnx(cg, keep))[0])

    return measure


class Derivation:
    """The candidates of one trained supernet, in order (trial n: `candidate(n, asked)`).

    Args:
        supernet: the trained supernet's final logits and temperature.
        space: the width space (groups not searched stay at full width).
        options, grid: width options per searched group; allowed widths per group.
        cost: prices a configuration and gives the target.
        rng: the strategy's seeded generator (the samples of trials >= 2).
        sample_tau: temperature of the sampled distributions (None: the supernet's final τ).
        checks: measures a latency candidate before it is handed out (None: trust the prediction).
    """

    def __init__(
        self,
        supernet: SupernetResult,
        space: WidthSpace,
        options: Mapping[int, list[int]],
        grid: Mapping[int, list[int]],
        cost: DMaskingCost,
        rng: np.random.Generator,
        checks: Checks | None = None,
    ) -> None:
        self.logits, self.final_tau = supernet.logits, supernet.final_tau
        self.space, self.options, self.grid = space, options, grid
        self.cost, self.rng, self.checks = cost, rng, checks
        self.verify = cost.config.verify if cost.on == "latency" else 0

    def raw(self, n: int) -> tuple[dict[int, float], str]:
        """Trial n's widths before the budget: 0 the argmax option, 1 the expected width, later a sample."""
        full = {g.id: float(g.hi) for g in self.space}
        if n == 0:
            raw = {
                gid: float(self.options[gid][int(len(a) - 1 - np.argmax(a[::-1]))])
                for gid, a in self.logits.items()
            }
            return full | raw, "argmax"
        probs = probs_at(self.logits, self.cost.config.sample_tau or self.final_tau)
        if n == 1:
            raw = {gid: float(np.dot(p, self.options[gid])) for gid, p in probs.items()}
            return full | raw, "expected"
        raw = {gid: float(self.options[gid][self.rng.choice(len(p), p=p)]) for gid, p in probs.items()}
        return full | raw, "sample"

    def on_budget(self, raw: Mapping[int, float], factor: float = 1.0) -> tuple[dict[int, int], float]:
        """`raw` scaled by one factor and snapped so that its prediction (times `factor`) lands just under
        the target."""
        predict = self.cost.predict if factor == 1.0 else (lambda w: self.cost.predict(w) * factor)
        return scale_onto(dict(raw), self.cost.target(), predict, lambda w: snap(self.grid, w), span=SPAN)

    def candidate(self, n: int, asked: list[dict[int, int]]) -> tuple[dict[int, int] | None, dict]:
        """Trial n's widths, never one of `asked`, and the facts to record with it (`predicted_raw` is for the
        strategy's correction, not recorded). (None, {}) when `RETRIES` samples all land, on the budget and
        checked, on configurations already asked: the budget leaves the grid nothing new to train."""
        raw, kind = self.raw(n)
        for tries in range(RETRIES + 1):
            if tries:  # a repeated configuration teaches nothing: draw again
                raw, kind = self.raw(max(n, 2))
            widths, scale = self.on_budget(raw)
            if widths in asked:  # checked or not, it was handed out before
                continue
            widths, scale, factor = self._verified(raw, widths, scale)
            if widths not in asked:
                break
        else:
            return None, {}
        snapped = snap(self.grid, raw)
        predict = self.cost.predict
        return widths, {
            "derived": kind,
            "raw_widths": {str(g): int(w) for g, w in snapped.items()},
            "raw_ratio": predict(snapped),
            "scale": round(2.0**scale, 4),
            "predicted_ratio": predict(widths),
            "predicted_raw": self.cost.predict_raw(widths),
            **({"check_factor": round(factor, 4)} if factor != 1.0 else {}),
        }

    def _verified(self, raw, widths: dict[int, int], scale: float) -> tuple[dict[int, int], float, float]:
        """Latency: measure the candidate; over the target as measured, scale its prediction by measured /
        predicted and put it back on the budget (at most `verify` times). Returns (widths, scale, factor)."""
        factor = 1.0
        for _ in range(self.verify if self.checks is not None else 0):
            checked = self.checks.ratio(widths)
            if checked <= self.cost.target():
                break
            factor = checked / max(self.cost.predict(widths), 1e-6)
            widths, scale = self.on_budget(raw, factor)
        return widths, scale, factor
