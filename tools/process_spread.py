"""How much one runner process differs from the next: the noise under every ratio measured as deployed.

    python tools/process_spread.py RUN_DIR/best.onnx RUN_DIR/baseline.onnx [--pairs 16] [--repeats 1]
    taskset -c 1 python tools/process_spread.py ...     # every process on one CPU

Measures like `measure_isolated` (each file alone in a fresh runner process, alternated pairs, 0.5 s per
process after a 0.125 s warm-up, as `LatencyJudge.deployed` at the default --latency-seconds, 1 intra-op thread)
and prints, per repeat, the ratio of the medians, the spread of the per-pair ratios and the coefficient of
variation of each file's per-process medians. docs/measurements.md ("Validation-split Taylor in the library")
has the figures for a 0.3 ms ResNet-20 on Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from onnxconet.latency.process import RunnerProcess
from onnxconet.latency.profile import Target


def per_process_medians(cand: str, ref: str, pairs: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    target, medians = Target(provider="cpu", threads=threads), {"c": [], "r": []}
    for p in range(pairs):
        for which in ("c", "r") if p % 2 == 0 else ("r", "c"):
            with RunnerProcess() as runner:
                runner.request("load", **target.load_request(cand if which == "c" else ref, which))
                ms = runner.request("time", seconds=0.5, warmup_seconds=0.125, min_runs=5)["times_ms"]
            medians[which].append(float(np.median(ms)))
    return np.asarray(medians["c"]), np.asarray(medians["r"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate")
    ap.add_argument("reference")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(f"CPUs this process may use: {sorted(os.sched_getaffinity(0))}")
    for i in range(a.repeats):
        c, r = per_process_medians(a.candidate, a.reference, a.pairs, a.threads)
        pair = c / r
        print(
            f"repeat {i}: ratio of the medians {np.median(c) / np.median(r):.4f}; per-pair ratios "
            f"{pair.min():.3f}-{pair.max():.3f}, std {pair.std() / np.median(pair):.1%} of their median; "
            f"per-process CV: candidate {c.std() / c.mean():.1%}, reference {r.std() / r.mean():.1%}"
        )


if __name__ == "__main__":
    main()
