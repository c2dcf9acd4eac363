"""Cost of a width configuration as a ratio to the full model: exact for FLOPs and params, predicted for
latency (from FLOPs, calibrated on the latencies the search has measured so far), and the rescaling that
moves a configuration onto the budget."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.space import WidthSpace


class Correction:
    """How a calibrated prediction is corrected by what the search measures: the median of measured / predicted
    over the measurements so far, clipped to [0.5, 2] (a factor outside says the prediction is broken, not off);
    1 without any."""

    def __init__(self) -> None:
        self.ratios: list[float] = []

    def add(self, measured: float, predicted: float) -> None:
        self.ratios.append(float(measured) / max(float(predicted), 1e-6))

    def factor(self) -> float:
        return float(np.clip(np.median(self.ratios), 0.5, 2.0)) if self.ratios else 1.0


def scale_onto(
    widths: dict[int, float],
    target: float,
    predict: Callable[[dict[int, int]], float],
    snap: Callable[[dict[int, float]], dict[int, int]],
    span: tuple[float, float, int] = (-3.0, 3.0, 18),
) -> tuple[dict[int, int], float]:
    """Scale every group of `widths` by one factor 2**s (then `snap` to allowed widths) so that `predict` lands at
    or just under `target`: bisection on s over `span` = (lo, hi, iterations). Returns (widths, s); when even
    2**lo misses the target, the widths at 2**lo."""
    lo, hi, iters = span
    best, best_s = snap({g: w * 2.0**lo for g, w in widths.items()}), lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = snap({g: w * 2.0**mid for g, w in widths.items()})
        if predict(cand) <= target:
            best, best_s, lo = cand, mid, mid
        else:
            hi = mid
    return best, best_s


class CostModel:
    """ratio(widths) for the budgeted quantity. For latency with a calibrated `predictor`
    (latency/predictor.py): the predictor refitted on its probes plus every candidate measured since
    (`LatencyPredictor.refit`), so each layer's cost follows the measurements, times the median measured / refitted
    ratio of the measured candidates; widths already measured are predicted by their median measurement (on
    Fashion-MNIST l1's widths measured 0.303, 0.302, 0.299 in three trials while the refit, pulled by the probes,
    kept predicting them under the 0.3 budget, and the run shipped them over it); a predictor without stored probes
    (a file from an older version) is scaled instead by the `Correction` of the measurements so far.
    On ResNet-20/Fashion-MNIST at 1 thread one factor was not enough: the knapsack start, wide only where the
    probes were few, measured 0.351 when predicted at 0.300, and the global factor then shrank every group.
    Without one: r = a + b * flops_ratio, least squares over the measured (flops_ratio, latency_ratio) pairs
    plus the baseline point (1, 1); before two measurements exist it is the FLOPs ratio itself."""

    def __init__(
        self, cg: ChannelGraph, space: WidthSpace, on: str = "latency", predictor=None, refit: bool = True
    ) -> None:
        self.cg, self.space, self.on, self.predictor = cg, space, on, predictor
        self.correction = Correction()
        self.base_flops = max(count_flops(cg), 1)
        self.base_params = max(count_params(cg), 1)
        self._zero = np.zeros(len(cg.group_of_bundle))
        self.points: list[tuple[float, float]] = [(1.0, 1.0)]
        self.a, self.b = 0.0, 1.0
        self.measured: list[tuple[dict[int, int], float]] = []
        self.fitted = predictor  # the predictor refitted on what was measured
        self.refit = refit
        self.residual = Correction()
        self.observed: list[
            dict
        ] = []  # every observation, in order (a joining worker replays the first ones)

    def exact(self, widths: dict[int, int]) -> tuple[float, float]:
        """(FLOPs ratio, params ratio) of a configuration."""
        keep = self.cg.keep_mask(widths, self._zero)
        return count_flops(self.cg, keep) / self.base_flops, count_params(self.cg, keep) / self.base_params

    def observe_trial(self, trial) -> None:
        """Refit on a finished trial's measured latency (a `search.base.Trial`; others are ignored)."""
        if trial.state.value == "complete" and trial.latency_ratio is not None:
            self.observe(trial.flops_ratio, trial.latency_ratio, trial.widths)

    def observe(self, flops_ratio: float, latency_ratio: float, widths: dict[int, int] | None = None) -> None:
        self.observed.append(
            {"flops_ratio": float(flops_ratio), "latency_ratio": float(latency_ratio),
             "widths": {str(k): int(v) for k, v in widths.items()} if widths is not None else None}
        )  # fmt: skip
        if self.predictor is not None and widths is not None:
            self.correction.add(latency_ratio, self.predictor.predict_ratio(widths))
            if self.refit and getattr(self.predictor, "data", None):
                self.measured.append((dict(widths), float(latency_ratio)))
                self.fitted = self.predictor.refit(self.measured)
                # what the refit still misses where the search measures (a least-squares fit over probes far
                # away does not pass through a point measured three times): one factor over the searched ones
                self.residual = Correction()
                for w, r in self.measured:
                    self.residual.add(r, self.fitted.predict_ratio(w))
        self.points.append((float(flops_ratio), float(latency_ratio)))
        x = np.array([p[0] for p in self.points])
        y = np.array([p[1] for p in self.points])
        if len(self.points) >= 3 and np.ptp(x) > 1e-6:
            b, a = np.polyfit(x, y, 1)
            self.a, self.b = float(a), float(max(b, 1e-3))

    def replay(self, observed: list[dict]) -> None:
        """Observe again what another process observed (`observed`, in order): the same corrections."""
        for o in observed:
            widths = {int(k): int(v) for k, v in o["widths"].items()} if o.get("widths") is not None else None
            self.observe(o["flops_ratio"], o["latency_ratio"], widths)

    def predict(self, widths: dict[int, int]) -> float:
        f, p = self.exact(widths)
        if self.on == "flops":
            return f
        if self.on == "params":
            return p
        if self.fitted is not self.predictor:  # refitted on the measurements
            again = [r for w, r in self.measured if w == widths]
            if again:  # measured: what was measured beats what is predicted
                return float(np.median(again))
            return float(self.fitted.predict_ratio(widths)) * self.residual.factor()
        if self.predictor is not None:
            return float(self.predictor.predict_ratio(widths)) * self.correction.factor()
        return self.a + self.b * f

    def rescale(self, widths: dict[int, int], target: float) -> dict[int, int]:
        """Scale every group of `widths` by one factor so the predicted ratio lands at (just under) `target`."""
        return scale_onto(widths, target, self.predict, self.space.clip)[0]

    def uniform(self, target: float) -> dict[int, int]:
        """The uniform widths on `target`: every group of the whole network scaled by one factor (`rescale`); what
        `l1` trains and where anneal and the knapsack's fill start."""
        return self.rescale(self.space.full(), target)
