"""Cost of a width configuration as a ratio to the full model: exact for FLOPs and params, predicted for
latency (from FLOPs, calibrated on the latencies the search has measured so far), and the rescaling that
moves a configuration onto the budget."""

from __future__ import annotations

import numpy as np

from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.space import WidthSpace


class CostModel:
    """ratio(widths) for the budgeted quantity. For latency with a calibrated `predictor`
    (latency/predictor.py): its prediction times the median measured/predicted ratio of the trials so far.
    Without one: r = a + b * flops_ratio, least squares over the measured (flops_ratio, latency_ratio) pairs
    plus the baseline point (1, 1); before two measurements exist it is the FLOPs ratio itself."""

    def __init__(self, cg: ChannelGraph, space: WidthSpace, on: str = "latency", predictor=None) -> None:
        self.cg, self.space, self.on, self.predictor = cg, space, on, predictor
        self.corrections: list[float] = []
        self.base_flops = max(count_flops(cg), 1)
        self.base_params = max(count_params(cg), 1)
        self._zero = np.zeros(len(cg.group_of_bundle))
        self.points: list[tuple[float, float]] = [(1.0, 1.0)]
        self.a, self.b = 0.0, 1.0

    def exact(self, widths: dict[int, int]) -> tuple[float, float]:
        """(FLOPs ratio, params ratio) of a configuration."""
        keep = self.cg.keep_mask(widths, self._zero)
        return count_flops(self.cg, keep) / self.base_flops, count_params(self.cg, keep) / self.base_params

    def observe(self, flops_ratio: float, latency_ratio: float, widths: dict[int, int] | None = None) -> None:
        if self.predictor is not None and widths is not None:
            self.corrections.append(
                float(latency_ratio) / max(float(self.predictor.predict_ratio(widths)), 1e-6)
            )
        self.points.append((float(flops_ratio), float(latency_ratio)))
        x = np.array([p[0] for p in self.points])
        y = np.array([p[1] for p in self.points])
        if len(self.points) >= 3 and np.ptp(x) > 1e-6:
            b, a = np.polyfit(x, y, 1)
            self.a, self.b = float(a), float(max(b, 1e-3))

    def predict(self, widths: dict[int, int]) -> float:
        f, p = self.exact(widths)
        if self.on == "flops":
            return f
        if self.on == "params":
            return p
        if self.predictor is not None:
            corr = float(np.median(self.corrections)) if self.corrections else 1.0
            return float(self.predictor.predict_ratio(widths)) * corr
        return self.a + self.b * f

    def rescale(self, widths: dict[int, int], target: float, iters: int = 18) -> dict[int, int]:
        """Scale every group of `widths` by one factor so the predicted ratio lands at (just under) `target`."""
        lo, hi = -3.0, 3.0  # log2 of the scale
        best = self.space.clip({g: w * 2.0**lo for g, w in widths.items()})
        for _ in range(iters):
            mid = (lo + hi) / 2
            cand = self.space.clip({g: w * 2.0**mid for g, w in widths.items()})
            if self.predict(cand) <= target:
                best, lo = cand, mid
            else:
                hi = mid
        return best
