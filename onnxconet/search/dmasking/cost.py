"""dmasking's cost side: what the supernet's logits step pays for its expected cost, and what a derived
candidate is predicted to cost when it is put on the budget.

One object (`DMaskingCost`) because the two phases must price widths the same way: the supernet learns its
distributions under `expected_ratio`, and the derivation puts their argmax / expectation / samples on the
budget with `predict`, the same model evaluated at one configuration (FBNetV2's effective shapes for flops |
params, a calibrated latency predictor for latency; with searched resolutions, the bound resolution's, scaled
to the baseline). The correction by what the trials measured is the run's `search.cost.Correction`, so
dmasking and the run's cost model clip it alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from onnxconet.errors import OnnxconetError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.search.calibration import PREDICTOR, calibrated_predictor
from onnxconet.search.cost import Correction
from onnxconet.search.dmasking.config import DMaskingConfig
from onnxconet.search.effective import EffectiveCost


class DMaskingCost:
    """The budgeted ratio of widths (or of width distributions) relative to the baseline.

    Attributes:
        on: the budgeted quantity (latency | flops | params).
        budget: the objective's budget (a ratio to the baseline).
        predictor: the latency predictor (budget on latency, without searched resolutions).
        effective: effective shapes of the model (budget on flops | params).
        resolutions: the searched `search.resolution.Resolution`s with their costs bound, ascending; None.
        resolution: the bound one (after the supernet), whose cost the derived candidates are priced at.
        correction: measured / predicted latency of the trials told so far.
    """

    def __init__(self, cg: ChannelGraph, on: str, budget: float, config: DMaskingConfig) -> None:
        self.on, self.budget, self.config = on, budget, config
        self.predictor = None
        self.effective = None if on == "latency" else EffectiveCost(cg, on)
        self.resolutions: list | None = None
        self.resolution = None
        self.correction = Correction()

    # ---- resolutions
    def search_resolutions(self, resolutions: list) -> None:
        """Price the supernet's distributions over these resolutions too (their costs bound)."""
        self.resolutions = sorted(resolutions, key=lambda r: r.size) or None

    def sizes(self) -> list[int] | None:
        return [r.size for r in self.resolutions] if self.resolutions else None

    def bind(self, size: int):
        """Price derived candidates at the searched resolution of this size; returns it."""
        res = next((r for r in self.resolutions or [] if r.size == int(size)), None)
        if res is None:
            raise OnnxconetError(
                f"resolution {size} is not one of the searched {[r.size for r in self.resolutions or []]}; "
                "use another --out"
            )
        self.resolution = res
        return res

    # ---- the supernet's side (differentiable)
    def expected_ratio(
        self,
        probs: Mapping[int, torch.Tensor],
        options: Mapping[int, Sequence[int]],
        res_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[budgeted ratio] under the distributions `probs` (and `res_probs` over the searched resolutions;
        differentiable)."""
        if self.resolutions and res_probs is not None:
            parts = [
                p * r.scale
                * (r.predictor.expected_latency(probs, options, unit="ratio") if self.on == "latency"
                   else r.effective.expected_ratio(probs, options))
                for p, r in zip(res_probs, self.resolutions, strict=True)
            ]  # fmt: skip
            return torch.stack(parts).sum()
        if self.on == "latency":
            return self.predictor.expected_latency(probs, options, unit="ratio")
        return self.effective.expected_ratio(probs, options)

    def arch_loss(self, task: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """The logits step's loss: task + hinge on the budget, or FBNet's task · a · log(cost)^b (package
        docstring)."""
        c = self.config
        if c.loss == "hinge":
            return task + c.penalty * torch.relu(ratio / self.budget - 1.0)
        if self.on == "latency":
            pred, scale = self.predictor, 1.0
            if pred is None and self.resolutions:
                pred, scale = self.resolutions[-1].predictor, self.resolutions[-1].scale
            unit = pred.reference_ms / scale * 1000.0  # µs of the baseline
        elif self.on == "flops":
            unit = self.effective.base / 1e6  # MMACs
        else:
            unit = self.effective.base / 1e3  # thousands of params
        lat = torch.clamp(ratio * unit, min=math.e)
        return task * c.fbnet_a * torch.log(lat) ** c.fbnet_b

    # ---- the derivation's side (one configuration)
    def predict_raw(self, widths: Mapping[int, int], res=None) -> float:
        """The model's ratio of `widths` at `res` (default: the bound resolution, if any), uncorrected."""
        res = res or self.resolution
        if res is not None:
            cost = (
                res.predictor.predict_ratio(widths) if self.on == "latency" else res.effective.ratio(widths)
            )
            return float(cost) * res.scale
        if self.on == "latency":
            return float(self.predictor.predict_ratio(widths))
        return float(self.effective.ratio(widths))

    def predict(self, widths: Mapping[int, int]) -> float:
        """`predict_raw` corrected by the trials measured so far."""
        return self.predict_raw(widths) * self.correction.factor()

    def target(self) -> float:
        """What derived candidates aim at: the budget, times `margin` for latency (measurement noise)."""
        return self.budget * (self.config.margin if self.on == "latency" else 1.0)


def latency_predictor(ctx, cg: ChannelGraph, space, probes: int) -> tuple[object, dict]:
    """dmasking's own latency predictor when the run has none (`ctx.out / PREDICTOR`, loaded on resume).

    Returns (predictor, facts for the supernet's summary): the calibration's seconds and fit when it was
    calibrated now, none when it was loaded.
    """
    path = Path(ctx.out) / PREDICTOR
    before = _stamp(path)
    t0 = time.perf_counter()
    pred = calibrated_predictor(ctx, cg, space, n=probes, path=path)
    if before is not None and _stamp(path) == before:  # loaded, not calibrated
        return pred, {}
    facts = {
        "predictor_seconds": round(time.perf_counter() - t0, 1),
        "predictor_fit": {
            "measurements": pred.report.measurements,
            "loo_median_abs_err": pred.report.loo_median_abs_err,
            "loo_max_abs_err": pred.report.loo_max_abs_err,
        },
    }
    return pred, facts


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None
