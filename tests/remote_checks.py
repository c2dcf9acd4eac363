"""Checks the agent's and the SSH device's tests share: a device on this machine must measure what local
does."""

from __future__ import annotations

import pytest

from onnxconet.latency.profile import Target, measure_isolated
from tests.onnx_builders import small_cnn


def timing_pair() -> tuple[bytes, bytes]:
    """Two models whose isolated-process ratio is steady (~0.35 vs ~1.2 ms at 32x32, 1 thread): the first
    smaller. Below ~20 us (small_cnn's default) process-to-process spread decides a ratio (22 vs 14, 26 vs 12
    seen in CI)."""
    mid, big = (small_cnn(width=w, layers=3, hw=32).SerializeToString() for w in (24, 48))
    return mid, big


def assert_isolated_ratio_is_local(remote: Target) -> None:
    """The deployed ratio (fresh processes) of `timing_pair()` on `remote` equals the local one within 50 %
    (both on this machine), and the smaller model measured smaller."""
    mid, big = timing_pair()
    on_device = measure_isolated(mid, big, remote, pairs=2, seconds=0.2)
    here = measure_isolated(mid, big, Target(provider="cpu", threads=1), pairs=2, seconds=0.2)
    assert here.ratio < 1 / 1.5
    assert on_device.ratio == pytest.approx(here.ratio, rel=0.5), (on_device, here)
