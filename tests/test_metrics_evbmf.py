"""EVBMF: rank recovery, noise estimate, degenerate inputs, and agreement with the AdaS/CONetV2 port."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from onnxconet.errors import OnnxconetError
from onnxconet.metrics.evbmf import MetricError, evbmf


def low_rank_plus_noise(
    seed: int, shape: tuple[int, int] = (60, 120), rank: int = 5, sigma: float = 0.1, signal: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """(signal + noise, signal): a random rank-`rank` matrix plus iid N(0, sigma^2) noise."""
    rng = np.random.default_rng(seed)
    L, M = shape
    x = signal * rng.standard_normal((L, rank)) @ rng.standard_normal((rank, M))
    return x + sigma * rng.standard_normal((L, M)), x


# --- Oracle: a re-implementation of the EVBMF of mahdihosseini/AdaS (numpy port of Nakajima's
# MATLAB code, via CasvandenBogaard/VBMF), same bounds, objective, optimizer defaults and shrinkage.
# Only change: transpose to L <= M, which the original leaves to the caller and CONetV2 forgets.


def _oracle_objective(sigma2, L, M, s, residual, xubar):
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
    obj = np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1)
    obj += np.sum(np.log((tau_z1 + 1) / z1)) + alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return obj + residual / (M * sigma2) + (L - len(s)) * np.log(sigma2)


def oracle_evbmf(y: np.ndarray) -> tuple[np.ndarray, float]:
    """Kept shrunk singular values and sigma2, as the AdaS EVBMF computes them (H = L)."""
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    H = L
    alpha = L / M
    tauubar = 2.5129 * np.sqrt(alpha)
    s = np.linalg.svd(y, compute_uv=False)[:H]
    residual = 0.0  # H == L
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = int(np.min([np.ceil(L / (1 + alpha)) - 1, H])) - 1
    upper = (np.sum(s**2) + residual) / (L * M)
    lower = np.max([s[eH_ub + 1] ** 2 / (M * xubar), np.mean(s[eH_ub + 1 :] ** 2) / M])
    opt = minimize_scalar(
        _oracle_objective, args=(L, M, s, residual, xubar), bounds=[lower, upper], method="bounded"
    )
    sigma2 = opt.x
    threshold = np.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    pos = int(np.sum(s > threshold))
    sp = s[:pos]
    d = (sp / 2) * (
        1
        - (L + M) * sigma2 / sp**2
        + np.sqrt((1 - (L + M) * sigma2 / sp**2) ** 2 - 4 * L * M * sigma2**2 / sp**4)
    )
    return d, float(sigma2)


@pytest.mark.parametrize("seed", range(4))
def test_recovers_rank_and_noise_of_low_rank_plus_noise(seed):
    y, _ = low_rank_plus_noise(seed)
    result = evbmf(y)
    assert result.rank == 5
    assert result.values.shape == (5,)
    assert np.all(np.diff(result.values) <= 0), "values must be descending"
    assert abs(result.sigma2 / 0.1**2 - 1) < 0.3


@pytest.mark.parametrize("seed", range(4))
def test_transposed_input_gives_same_result(seed):
    y, _ = low_rank_plus_noise(seed)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank == 5
    np.testing.assert_allclose(a.values, b.values, rtol=1e-7)
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_pure_noise_has_rank_at_most_one(seed):
    rng = np.random.default_rng(100 + seed)
    result = evbmf(0.05 * rng.standard_normal((64, 200)))
    assert result.rank <= 1
    assert abs(result.sigma2 / 0.05**2 - 1) < 0.3


def test_kept_values_follow_the_shrinkage_formula():
    y, _ = low_rank_plus_noise(7, sigma=0.2)
    result = evbmf(y)
    L, M, sigma2 = 60, 120, result.sigma2
    s = np.linalg.svd(y, compute_uv=False)[: result.rank]
    a = 1 - (L + M) * sigma2 / s**2
    expected = (s / 2) * (a + np.sqrt(a**2 - 4 * L * M * sigma2**2 / s**4))
    np.testing.assert_allclose(result.values, expected, rtol=1e-9)
    assert np.all(result.values < s)  # shrinkage removes the noise inflation
    # Nothing above the threshold sqrt(M sigma2 (1 + tau)(1 + alpha / tau)) is dropped, nothing below kept.
    alpha = L / M
    tau = 2.5129 * np.sqrt(alpha)
    threshold = np.sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))
    all_s = np.linalg.svd(y, compute_uv=False)
    assert np.sum(all_s > threshold) == result.rank


def test_scale_equivariance_at_weight_scale():
    # Typical CNN weights are ~1e-2; the port's absolute optimizer tolerance (1e-5) is coarser than its
    # whole sigma2 interval there. Ours must give c * values and c^2 * sigma2.
    y, _ = low_rank_plus_noise(3)
    a = evbmf(y)
    for c in (1e-3, 1e3):
        b = evbmf(c * y)
        assert b.rank == a.rank
        np.testing.assert_allclose(b.values, c * a.values, rtol=1e-6)
        assert b.sigma2 == pytest.approx(c * c * a.sigma2, rel=1e-6)


def test_all_zero_and_empty_give_rank_zero():
    for y in (np.zeros((8, 20)), np.zeros((20, 8)), np.zeros((0, 5))):
        result = evbmf(y)
        assert result.rank == 0 and result.values.size == 0 and result.sigma2 == 0.0


def test_single_row_gives_rank_zero():
    result = evbmf(np.arange(1.0, 11.0)[None, :])
    assert result.rank == 0
    assert np.isfinite(result.sigma2)


def test_exactly_low_rank_matrix_is_finite():
    # Zero singular values make the port's objective inf everywhere; ours handles them.
    rng = np.random.default_rng(1)
    y = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 80))
    result = evbmf(y)
    assert result.rank == 3
    np.testing.assert_allclose(result.values, np.linalg.svd(y, compute_uv=False)[:3], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_with_shape(bad):
    y = np.ones((6, 9))
    y[2, 3] = bad
    with pytest.raises(MetricError, match="6x9"):
        evbmf(y)
    assert issubclass(MetricError, OnnxconetError)


def test_non_matrix_raises():
    with pytest.raises(MetricError, match="2-D"):
        evbmf(np.ones((2, 3, 4)))


def test_torch_input_and_svd_method_agree_with_default():
    y, _ = low_rank_plus_noise(5)
    a = evbmf(y)
    b = evbmf(torch.from_numpy(y).float())  # float32 tensor -> float64 internally
    c = evbmf(y, method="svd")
    assert a.rank == b.rank == c.rank
    np.testing.assert_allclose(b.values, a.values, rtol=1e-5)
    np.testing.assert_allclose(c.values, a.values, rtol=1e-7)


def test_gram_route_falls_back_to_svd_for_wide_spectra():
    # Kept values spanning 1e5: the Gram matrix alone would lose digits on the smallest one.
    rng = np.random.default_rng(2)
    L, M, s = 40, 300, np.array([1e4, 1e3, 1e2, 1e1, 1.0, 0.3])
    u = np.linalg.qr(rng.standard_normal((L, s.size)))[0]
    v = np.linalg.qr(rng.standard_normal((M, s.size)))[0]
    y = (u * s) @ v.T + 1e-4 * rng.standard_normal((L, M))
    a, b = evbmf(y), evbmf(y, method="svd")
    assert a.rank == b.rank == s.size
    np.testing.assert_allclose(a.values, b.values, rtol=1e-9)
    np.testing.assert_allclose(a.values, s, rtol=1e-3)


@pytest.mark.parametrize(
    "seed,shape,rank", [(0, (30, 80), 4), (1, (80, 30), 4), (2, (64, 576), 10), (3, (40, 40), 6)]
)
def test_matches_adas_oracle(seed, shape, rank):
    # O(1) entries so that the port's absolute optimizer tolerance is not the limiting factor.
    y, _ = low_rank_plus_noise(seed, shape=shape, rank=rank, sigma=1.0, signal=1.5)
    values, sigma2 = oracle_evbmf(y)
    result = evbmf(y)
    assert result.rank == values.size == rank
    assert result.sigma2 == pytest.approx(sigma2, rel=1e-4)
    np.testing.assert_allclose(result.values, values, rtol=1e-5)
