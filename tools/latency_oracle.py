"""Two latency measurements that are *not* onnxconet's, for tools/bench_latency.py's `deployed` section.

- `deployed_ratio`: the oracle. Each file alone in its own fresh `python -c` process that does what a user's
  service does (`onnxruntime.InferenceSession(path)` with default options, intra-op threads set when asked),
  warms up, then runs back to back; processes alternated A B, B A, ...; the ratio of the medians of the
  per-process medians. Written here from scratch so that onnxconet's runner is checked, not trusted.
- `previous_inloop_ratio`: the in-loop method onnxconet used before (both sessions in this process, thread
  spinning off, single runs interleaved A B / B A, ratio of the 10th percentiles), kept only to show what the
  change fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

_ORACLE = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
so = ort.SessionOptions()
if threads:
    so.intra_op_num_threads = threads
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
x = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)}
t0 = time.perf_counter()
while time.perf_counter() - t0 < 0.3:
    s.run(None, x)
ts = []
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds or len(ts) < 10:
    a = time.perf_counter(); s.run(None, x); ts.append(time.perf_counter() - a)
print(json.dumps({"median_ms": float(np.median(ts)) * 1e3, "runs": len(ts)}))
"""


def _alone(path: str, threads: int, seconds: float) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _ORACLE, path, str(threads), str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)["median_ms"]


def deployed_ratio(a: str, b: str, threads: int, pairs: int = 4, seconds: float = 1.0) -> dict:
    """The oracle's ratio a / b (files), with the per-pair ratios and both medians (ms)."""
    ma, mb = [], []
    for p in range(pairs):
        if p % 2 == 0:
            ma.append(_alone(a, threads, seconds))
            mb.append(_alone(b, threads, seconds))
        else:
            mb.append(_alone(b, threads, seconds))
            ma.append(_alone(a, threads, seconds))
    return {
        "ratio": float(np.median(ma) / np.median(mb)),
        "pair_ratios": [x / y for x, y in zip(ma, mb, strict=True)],
        "a_ms": float(np.median(ma)),
        "b_ms": float(np.median(mb)),
    }


def previous_inloop_ratio(a: str, b: str, threads: int, seconds: float = 1.5) -> float:
    """The method before: two spin-free sessions in this process, single runs interleaved, p10 ratio."""

    def session(path: str):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        i = s.get_inputs()[0]
        return s, {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)}

    (sa, xa), (sb, xb) = session(a), session(b)

    def run(s, x) -> float:
        t = time.perf_counter()
        s.run(None, x)
        return time.perf_counter() - t

    for _ in range(10):
        run(sa, xa), run(sb, xb)
    ta, tb = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if len(ta) % 2:
            tb.append(run(sb, xb))
            ta.append(run(sa, xa))
        else:
            ta.append(run(sa, xa))
            tb.append(run(sb, xb))
    return float(np.percentile(ta, 10) / np.percentile(tb, 10))
