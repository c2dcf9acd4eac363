"""CONetV2 metrics (unfold, R/G/kappa/QC), momentum, group score, width rule, magnitude scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from onnxconet.metrics.conet import (
    LayerMetrics,
    MetricMomentum,
    conet_width_update,
    group_score,
    layer_metrics,
    metrics_from_values,
    quality_condition,
    unfold,
    weight_metrics,
)
from onnxconet.metrics.evbmf import MetricError
from onnxconet.metrics.magnitude import l1_out, l2_out


def weight_with_out_spectrum(
    s: np.ndarray, cout: int, cin: int, k: int, noise: float, seed: int = 0
) -> np.ndarray:
    """Conv weight (cout, cin, k, k) whose "out" unfolding is U diag(s) V^T plus iid noise."""
    rng = np.random.default_rng(seed)
    m = cin * k * k
    u = np.linalg.qr(rng.standard_normal((cout, s.size)))[0]
    v = np.linalg.qr(rng.standard_normal((m, s.size)))[0]
    y = (u * s) @ v.T + noise * rng.standard_normal((cout, m))
    return y.reshape(cout, cin, k, k)


# --- unfold


def test_unfold_conv_shapes_and_layout():
    w = np.arange(8 * 3 * 3 * 3, dtype=np.float64).reshape(8, 3, 3, 3)
    y_in, y_out = unfold(w, "in"), unfold(w, "out")
    assert y_in.shape == (3, 72) and y_out.shape == (8, 27)
    np.testing.assert_array_equal(y_in[1], w[:, 1].ravel())  # row i = everything feeding from input i
    np.testing.assert_array_equal(y_out[5], w[5].ravel())


def test_unfold_linear_and_torch():
    w = torch.randn(10, 20)
    assert unfold(w, "in").shape == (20, 10) and unfold(w, "out").shape == (10, 20)
    np.testing.assert_array_equal(unfold(w, "in"), w.numpy().astype(np.float64).T)
    assert unfold(w, "out").dtype == np.float64


def test_unfold_rejects_bad_input():
    with pytest.raises(MetricError, match="shape"):
        unfold(np.ones(5), "out")
    with pytest.raises(ValueError):
        unfold(np.ones((2, 2)), "sideways")


# --- R, G, kappa, QC


def test_metrics_from_values_hand_computed():
    m = metrics_from_values(np.array([4.0, 2.0, 1.0]), n=4)
    assert m.rank == pytest.approx(0.75)
    assert m.knowledge_gain == pytest.approx((1 + 0.5 + 0.25) / 4)
    assert m.condition == pytest.approx(4.0)
    assert m.qc == pytest.approx(math.atan(0.75 / (1 - 1 / 4)))  # = pi / 4
    assert m.qc == pytest.approx(math.pi / 4)


def test_qc_guards():
    assert metrics_from_values(np.array([]), n=16) == LayerMetrics(0.0, 0.0, 0.0, 0.0)  # N' = 0
    lone = metrics_from_values(np.array([3.0]), n=16)  # N' = 1 -> kappa = 1
    assert lone.condition == 1.0 and lone.knowledge_gain == pytest.approx(1 / 16)
    assert lone.qc == pytest.approx(0.5 * math.pi / 16)
    flat = metrics_from_values(np.full(8, 2.0), n=8)  # all equal, R = 1: the perfect layer
    assert flat.qc == pytest.approx(0.5 * math.pi)
    assert quality_condition(0.5, 0.0) == 0.0
    # QC stays in [0, pi/2] and grows with R at fixed kappa, falls with kappa at fixed R.
    assert 0 < quality_condition(0.2, 10.0) < quality_condition(0.4, 10.0) < math.pi / 2
    assert quality_condition(0.4, 100.0) < quality_condition(0.4, 10.0)


def test_layer_metrics_on_known_spectrum():
    # "out" unfolding (8, 400) with 5 large separated values and tiny noise: EVBMF keeps exactly those 5,
    # and shrinkage is negligible, so R, G, kappa and QC follow from s by hand.
    s = np.array([50.0, 40.0, 30.0, 20.0, 10.0])
    w = weight_with_out_spectrum(s, cout=8, cin=16, k=5, noise=1e-6)
    m = layer_metrics(w, "out")
    assert m.rank == pytest.approx(5 / 8)
    assert m.knowledge_gain == pytest.approx(np.sum(s / 50.0) / 8, rel=1e-5)
    assert m.condition == pytest.approx(5.0, rel=1e-5)
    assert m.qc == pytest.approx(math.atan((5 / 8) / (1 - 1 / 5)), rel=1e-5)
    # Same weight through torch: same numbers.
    mt = layer_metrics(torch.from_numpy(w), "out")
    assert mt.qc == pytest.approx(m.qc, rel=1e-12)


def test_layer_metrics_rank_one_and_zero_weights():
    w = weight_with_out_spectrum(np.array([30.0]), cout=12, cin=8, k=3, noise=1e-4)
    m = layer_metrics(w, "out")
    assert m.rank == pytest.approx(1 / 12) and m.condition == 1.0
    assert m.qc == pytest.approx(0.5 * math.pi / 12)
    zero = layer_metrics(np.zeros((16, 8, 3, 3)), "in")
    assert zero == LayerMetrics(0.0, 0.0, 0.0, 0.0)


def test_weight_metrics_reports_failures_by_name():
    good = weight_with_out_spectrum(np.array([5.0, 3.0]), cout=8, cin=4, k=3, noise=1e-3)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    metrics, errors = weight_metrics({"layer1.conv": good, "layer2.conv": bad, "fc": np.ones(4)})
    assert set(metrics) == {"layer1.conv"} and set(metrics["layer1.conv"]) == {"in", "out"}
    assert set(errors) == {"layer2.conv", "fc"}
    assert "layer2.conv" in errors["layer2.conv"] and "NaN" in errors["layer2.conv"]
    assert "8x36" in errors["layer2.conv"] or "4x72" in errors["layer2.conv"]


# --- momentum and group score


def test_momentum_update_and_resume():
    mom = MetricMomentum(gamma=0.5)
    assert mom.value("g0") is None
    assert mom.update("g0", [1.0, 3.0, 2.0]) == pytest.approx(3.0)  # max over the trial's epochs
    assert mom.update("g0", [2.0]) == pytest.approx(0.5 * 3.0 + 2.0)
    mom.update("g1", [0.25])
    restored = MetricMomentum(gamma=0.5)
    restored.load_state_dict(json.loads(json.dumps(mom.state_dict())))
    assert restored.value("g0") == pytest.approx(3.5) and restored.value("g1") == pytest.approx(0.25)
    assert restored.update("g0", [1.0]) == mom.update("g0", [1.0])


def test_momentum_rejects_bad_input():
    mom = MetricMomentum()
    with pytest.raises(MetricError):
        mom.update("g", [])
    with pytest.raises(MetricError):
        mom.update("g", [1.0, float("nan")])
    with pytest.raises(MetricError):
        mom.load_state_dict({"values": {"g": 1.0}})
    with pytest.raises(ValueError):
        MetricMomentum(gamma=1.5)


def test_group_score():
    assert group_score(in_metrics=[1.0, 2.0], out_metrics=[3.0]) == pytest.approx(2.0)
    assert group_score(in_metrics=[], out_metrics=[0.5]) == pytest.approx(0.5)
    with pytest.raises(MetricError):
        group_score([], [])
    with pytest.raises(MetricError):
        group_score([float("inf")], [1.0])


# --- width rule


def test_width_update_clips_factor_and_bounds():
    assert conet_width_update(64, 10.0, lo=16, hi=256) == 128  # factor capped at 2
    assert conet_width_update(64, -0.9, lo=16, hi=256) == 32  # factor floored at 0.5
    assert conet_width_update(64, 0.25, lo=16, hi=256) == 80
    assert conet_width_update(200, 0.5, lo=16, hi=256) == 256  # hi bound
    assert conet_width_update(20, -0.5, lo=16, hi=256) == 16  # lo bound
    assert conet_width_update(64, 0.0, lo=16, hi=256) == 64


def test_width_update_divisor_rounding():
    assert conet_width_update(30, 0.1, lo=8, hi=512, divisor=8) == 32  # 33 -> 32
    assert conet_width_update(36, 0.0, lo=8, hi=512, divisor=8) == 40  # 4.5 multiples: half up
    assert conet_width_update(8, -0.5, lo=1, hi=512, divisor=8) == 8  # never below one multiple
    assert conet_width_update(8, -0.5, lo=10, hi=30, divisor=8) == 16  # bounds snap to multiples inside
    assert conet_width_update(64, 1.0, lo=10, hi=30, divisor=8) == 24
    assert conet_width_update(64, 1.0, lo=10, hi=12, divisor=8) == 12  # no multiple inside: plain bounds


def test_width_update_annealing():
    # Without rng p = exp(-1 / (|delta| T)) is added: delta 0.2, T 5 -> p = e^-1.
    expected = math.floor(64 * (1.2 + math.exp(-1.0)) / 2 + 0.5) * 2
    assert conet_width_update(64, 0.2, lo=16, hi=256, temperature=5.0) == expected
    assert conet_width_update(64, 0.0, lo=16, hi=256, temperature=5.0) == 64  # p = 0 at delta = 0
    assert conet_width_update(64, 0.2, lo=16, hi=256, temperature=0.0) == conet_width_update(
        64, 0.2, lo=16, hi=256
    )
    with pytest.raises(MetricError):
        conet_width_update(64, float("nan"), lo=16, hi=256)
    with pytest.raises(ValueError):
        conet_width_update(64, 0.1, lo=32, hi=16)


def test_width_update_seeded_rng_is_deterministic():
    deltas = np.linspace(-0.4, 0.4, 17)

    def run(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [conet_width_update(64, d, lo=16, hi=256, temperature=3.0, rng=rng) for d in deltas]

    assert run(7) == run(7)
    assert run(7) != run(8)
    plain = [conet_width_update(64, d, lo=16, hi=256) for d in deltas]
    annealed = run(7)
    assert any(a < b for a, b in zip(annealed, plain, strict=True))  # both signs of p occur
    assert any(a > b for a, b in zip(annealed, plain, strict=True))


# --- magnitude scores


def test_l1_l2_scores():
    w = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) - 10
    wn = w.numpy().astype(np.float64)
    np.testing.assert_allclose(l1_out(w), np.abs(wn).reshape(2, -1).sum(1))
    np.testing.assert_allclose(l2_out(w), np.sqrt((wn**2).reshape(2, -1).sum(1)))
    np.testing.assert_allclose(l1_out(w, axis=1), np.abs(wn).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(l2_out(wn, axis=-1), np.sqrt((wn**2).sum(axis=(0, 1, 2))))
    np.testing.assert_allclose(l1_out(np.array([-1.0, 2.0])), [1.0, 2.0])
    with pytest.raises(MetricError):
        l1_out(wn, axis=4)
