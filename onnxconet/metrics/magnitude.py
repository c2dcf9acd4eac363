"""Magnitude channel scores: the L1 / L2 norm of each slice of a weight along one axis.

Used to choose which channels to keep when a group shrinks (axis 0 = output channels of a conv or
linear weight, axis 1 = its input channels; a 1-D BN scale or bias works with axis 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxconet.metrics.evbmf import MetricError, as_float64


def _slices(weight: Any, axis: int) -> np.ndarray:
    """Float64 weight with ``axis`` moved first and the rest flattened: (C, rest)."""
    w = as_float64(weight)
    if w.ndim == 0:
        raise MetricError("channel scores need a weight with at least one dimension, got a scalar")
    if not -w.ndim <= axis < w.ndim:
        raise MetricError(f"axis {axis} is out of range for a weight of shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise MetricError(f"weight of shape {w.shape} holds NaN or Inf values; channel scores undefined")
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def l1_out(weight: Any, axis: int = 0) -> np.ndarray:
    """L1 norm of each slice along ``axis`` (sum of |w| over the other axes).

    Args:
        weight: numpy array or torch tensor, e.g. a conv weight ``(Cout, Cin, kh, kw)``.
        axis: the channel axis (0 = output channels).

    Returns:
        ``(weight.shape[axis],)`` float64 scores.

    Raises:
        MetricError: scalar weight, axis out of range or non-finite values.
    """
    return np.abs(_slices(weight, axis)).sum(axis=1)


def l2_out(weight: Any, axis: int = 0) -> np.ndarray:
    """L2 norm of each slice along ``axis`` (sqrt of the sum of w^2 over the other axes).

    Args:
        weight: numpy array or torch tensor, e.g. a conv weight ``(Cout, Cin, kh, kw)``.
        axis: the channel axis (0 = output channels).

    Returns:
        ``(weight.shape[axis],)`` float64 scores.

    Raises:
        MetricError: scalar weight, axis out of range or non-finite values.
    """
    return np.linalg.norm(_slices(weight, axis), axis=1)
