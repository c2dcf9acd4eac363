"""CONetV2 layer metrics (rank, knowledge gain, mapping condition, QC) and the width rule they drive.

Reading order: ``unfold`` -> ``layer_metrics`` (EVBMF on one unfolding) -> ``weight_metrics`` (every
layer, failures reported) -> ``MetricMomentum`` (across trials) -> ``group_score`` (per channel group)
-> ``conet_width_update`` (the new width). Formulas: /work/shared/METHODS.md, section CONetV2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from onnxconet.metrics.evbmf import MetricError, as_float64, evbmf

logger = logging.getLogger(__name__)

Mode = Literal["in", "out"]
MODES: tuple[Mode, Mode] = ("in", "out")


@dataclass
class LayerMetrics:
    """CONetV2 metrics of one unfolding of one weight.

    Attributes:
        rank: R = N' / N, kept EVBMF components over the channel count N of that side.
        knowledge_gain: G = (1/N) * sum_i sigma_i / sigma_1 over the kept, shrunk values.
        condition: kappa = sigma_1 / sigma_N' (0 when nothing is kept).
        qc: arctan(R / (1 - 1/kappa)) in [0, pi/2], with the guards of :func:`quality_condition`.
    """

    rank: float
    knowledge_gain: float
    condition: float
    qc: float


def unfold(weight: Any, mode: Mode) -> np.ndarray:
    """Unfold a conv or linear weight along its input or output channels, as float64.

    Args:
        weight: ``(Cout, Cin, *kernel)`` conv weight or ``(Cout, Cin)`` linear weight (numpy or torch).
            Grouped convs have ``Cin / groups`` as their second dimension; that is the N of ``"in"``.
        mode: ``"in"`` gives ``(Cin, Cout * prod(kernel))``; ``"out"`` gives ``(Cout, Cin * prod(kernel))``.

    Returns:
        The unfolded matrix; its row count is the normalizer N of the metrics.

    Raises:
        MetricError: if the weight has fewer than 2 dimensions.
        ValueError: if ``mode`` is neither ``"in"`` nor ``"out"``.
    """
    w = as_float64(weight)
    if w.ndim < 2:
        raise MetricError(
            f"cannot unfold a weight of shape {w.shape}: expected (Cout, Cin, ...) with >= 2 dims"
        )
    if mode == "out":
        return w.reshape(w.shape[0], -1)  # (Cout, Cin*k*k)
    if mode == "in":
        return np.swapaxes(w, 0, 1).reshape(w.shape[1], -1)  # (Cin, Cout*k*k)
    raise ValueError(f"mode must be 'in' or 'out', got {mode!r}")


def quality_condition(rank: float, condition: float) -> float:
    """QC = arctan(R / (1 - 1/kappa)), guarded at kappa = 0 and kappa = 1.

    Guards (kappa >= 1 whenever something is kept):

    - ``kappa == 0`` (nothing kept, R = 0): QC = 0. Nothing rises above the noise, so the layer gets
      the lowest score, which is also the formula's value in the limit R -> 0.
    - ``kappa == 1`` (one kept value, or all kept values equal): QC = (pi/2) * R. The raw limit
      kappa -> 1+ is pi/2 for every R > 0, which would score a single surviving direction
      (N' = 1, typical of near-random weights) like a perfect layer and make the metric jump to its
      maximum. (pi/2) * R keeps the perfect-layer value pi/2 at R = 1 and gives about arctan(R), the
      value of an ill-conditioned layer of that rank, when R is small.

    Args:
        rank: R in [0, 1].
        condition: kappa, 0 or >= 1.

    Returns:
        QC in [0, pi/2].
    """
    if condition <= 0.0 or rank <= 0.0:
        return 0.0
    inv = 1.0 / condition
    if inv >= 1.0 - 1e-12:
        return 0.5 * math.pi * rank
    return math.atan(rank / (1.0 - inv))


def metrics_from_values(values: np.ndarray, n: int) -> LayerMetrics:
    """Rank, knowledge gain, condition and QC from kept singular values.

    Args:
        values: kept, shrunk singular values, descending (length N').
        n: the normalizer N (channel count of the unfolded side), > 0.

    Returns:
        The four metrics; all zero when ``values`` is empty.
    """
    values = np.asarray(values, dtype=np.float64)
    if n <= 0:
        raise MetricError(f"metric normalizer must be positive, got N = {n}")
    if values.size == 0:
        return LayerMetrics(rank=0.0, knowledge_gain=0.0, condition=0.0, qc=0.0)
    rank = values.size / n
    gain = float(np.sum(values / values[0])) / n
    condition = float(values[0] / values[-1])
    return LayerMetrics(
        rank=rank, knowledge_gain=gain, condition=condition, qc=quality_condition(rank, condition)
    )


def layer_metrics(weight: Any, mode: Mode) -> LayerMetrics:
    """CONetV2 metrics of one unfolding of a conv or linear weight.

    EVBMF runs on the unfolding (transposed internally when it has more rows than columns); N is the
    row count of the unfolding, i.e. Cin for ``"in"`` and Cout for ``"out"``, as in CONetV2 (so R can
    stay below 1 when N exceeds the other side, e.g. ``"in"`` of a 1x1 conv that reduces channels).

    Args:
        weight: conv ``(Cout, Cin, kh, kw)`` or linear ``(Cout, Cin)`` weight, numpy or torch.
        mode: ``"in"`` or ``"out"``.

    Returns:
        The layer's metrics for that unfolding.

    Raises:
        MetricError: non-finite weights or an EVBMF failure (the message names the shape).
    """
    y = unfold(weight, mode)
    result = evbmf(y)
    return metrics_from_values(result.values, y.shape[0])


def weight_metrics(
    named_weights: Mapping[str, Any], *, modes: Sequence[Mode] = MODES
) -> tuple[dict[str, dict[str, LayerMetrics]], dict[str, str]]:
    """Metrics of every named weight; failures are collected, never replaced by zeros.

    Args:
        named_weights: weight name -> conv or linear weight (numpy or torch).
        modes: unfoldings to compute per weight.

    Returns:
        ``(metrics, errors)``: ``metrics[name][mode]`` for each layer whose unfoldings all succeeded,
        and ``errors[name]`` = message (naming the layer) for each layer that failed; a failed layer
        is absent from ``metrics``.
    """
    metrics: dict[str, dict[str, LayerMetrics]] = {}
    errors: dict[str, str] = {}
    for name, weight in named_weights.items():
        try:
            metrics[name] = {mode: layer_metrics(weight, mode) for mode in modes}
        except MetricError as exc:
            errors[name] = f"layer {name!r}: {exc}"
            logger.warning("CONet metrics skipped for %s", errors[name])
    return metrics, errors


class MetricMomentum:
    """Momentum across trials: M <- gamma * M + m, per key; m is the max over a trial's epochs.

    The first update of a key sets M = m (M starts at 0). gamma (0.6-0.9 in CONetV2) steers how large
    the accumulated scores, and hence the widths, become.
    """

    def __init__(self, gamma: float = 0.8) -> None:
        """Create an empty accumulator.

        Args:
            gamma: decay of the previous value, in [0, 1].
        """
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"momentum gamma must lie in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        self._values: dict[str, float] = {}

    def update(self, key: str, trial_values: Sequence[float]) -> float:
        """Fold one trial's per-epoch metric values into the momentum of ``key``.

        Args:
            key: layer/unfolding or group identifier.
            trial_values: the metric at each epoch of the trial (at least one, all finite).

        Returns:
            The updated momentum value.

        Raises:
            MetricError: if ``trial_values`` is empty or holds NaN/Inf.
        """
        values = [float(v) for v in trial_values]
        if not values:
            raise MetricError(f"momentum update for {key!r}: the trial has no metric values")
        if not all(math.isfinite(v) for v in values):
            raise MetricError(f"momentum update for {key!r}: non-finite metric values {values}")
        new = self.gamma * self._values.get(key, 0.0) + max(values)
        self._values[key] = new
        return new

    def value(self, key: str) -> float | None:
        """Current momentum of ``key``, or None if it was never updated."""
        return self._values.get(key)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: ``{"gamma": float, "values": {key: float}}``."""
        return {"gamma": self.gamma, "values": dict(self._values)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore values saved by :meth:`state_dict` (to resume a search).

        The gamma of this instance (the current configuration) is kept; a different saved gamma is
        logged as a warning.

        Raises:
            MetricError: if ``d`` is malformed.
        """
        try:
            values = {str(k): float(v) for k, v in d["values"].items()}
            saved_gamma = float(d["gamma"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MetricError(
                f"momentum state is malformed ({exc}); expected {{'gamma': float, 'values': {{key: float}}}}"
            ) from exc
        if saved_gamma != self.gamma:
            logger.warning(
                "resumed momentum was saved with gamma %g; continuing with %g", saved_gamma, self.gamma
            )
        self._values = values


def group_score(in_metrics: Sequence[float], out_metrics: Sequence[float]) -> float:
    """CONetV2 score of a channel group: the mean over its producers' out- and consumers' in-metrics.

    Every unfolding counts once (the mean of the concatenation, not the mean of two means).

    Args:
        in_metrics: in-metrics of the layers that consume the group's channels.
        out_metrics: out-metrics of the layers that produce them.

    Returns:
        The mean.

    Raises:
        MetricError: if both sequences are empty or a value is NaN/Inf.
    """
    values = [float(v) for v in out_metrics] + [float(v) for v in in_metrics]
    if not values:
        raise MetricError("group score needs at least one producer or consumer metric; the group has none")
    if not all(math.isfinite(v) for v in values):
        raise MetricError(f"group score: non-finite metric values {values}")
    return sum(values) / len(values)


def conet_width_update(
    width: int,
    delta: float,
    *,
    lo: int,
    hi: int,
    divisor: int = 2,
    temperature: float | None = None,
    rng: np.random.Generator | None = None,
) -> int:
    """CONetV2 width rule: c <- round_to_divisor(c * clip(1 + delta, 0.5, 2)), clipped to [lo, hi].

    Annealing (``temperature`` given, CONetV2-SA): p = exp(-1 / (|delta| * T)) is added to delta;
    p = 0 when delta = 0 or T = 0 (the limit of the formula). Without ``rng`` p is always added, as
    in CONetV2 (a push towards growth). With ``rng`` the sign of p is drawn (+p or -p, equally likely):
    a symmetric perturbation that shrinks as T cools; one draw is made per call whatever delta is,
    so a seeded generator gives a reproducible sequence.

    Rounding goes to the nearest multiple of ``divisor`` (half up, at least ``divisor``); the clip
    uses the multiples of ``divisor`` inside [lo, hi] when there are any, else [lo, hi] itself.

    Args:
        width: current channel count (>= 1).
        delta: change of the group's momentum score between trials, M(t) - M(t-1).
        lo: smallest allowed width (>= 1).
        hi: largest allowed width (>= lo).
        divisor: width granularity (>= 1).
        temperature: annealing temperature T >= 0, e.g. 5 * (trials - t) / trials; None disables it.
        rng: generator for the annealing sign (see above).

    Returns:
        The new width.

    Raises:
        MetricError: if delta is NaN/Inf.
        ValueError: for invalid width, bounds, divisor or temperature.
    """
    if width < 1 or lo < 1 or hi < lo or divisor < 1:
        raise ValueError(
            f"invalid width update arguments: width={width}, lo={lo}, hi={hi}, divisor={divisor}"
        )
    if not math.isfinite(delta):
        raise MetricError(f"width update: the score change delta is {delta}; check the layer metrics")
    if temperature is not None:
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"annealing temperature must be finite and >= 0, got {temperature}")
        sign = 1.0 if rng is None else (1.0 if rng.random() < 0.5 else -1.0)
        scale = abs(delta) * temperature
        p = math.exp(-1.0 / scale) if scale > 0 else 0.0
        delta = delta + sign * p
    factor = min(max(1.0 + delta, 0.5), 2.0)
    new = max(divisor, math.floor(width * factor / divisor + 0.5) * divisor)
    lo_d = -(-lo // divisor) * divisor  # ceil to a multiple
    hi_d = (hi // divisor) * divisor
    if lo_d <= hi_d:
        lo, hi = lo_d, hi_d
    return int(min(max(new, lo), hi))
