"""How much one runner process differs from the next: the noise under every ratio measured as deployed.

    python tools/process_spread.py RUN_DIR/best.onnx RUN_DIR/baseline.onnx [--pairs 16] [--repeats 1]
    taskset -c 1 python tools/process_spread.py ...     # every process on one CPU

Measures with `measure_isolated` as `LatencyJudge.deployed` does at the default --latency-seconds (each file alone
in a fresh runner process, alternated pairs, 0.5 s per process after its 0.25 s warm-up; 1 intra-op thread, a
fixed number of pairs) and prints, per repeat, the ratio of the medians, the spread of the per-pair ratios and the coefficient of
variation of each file's per-process medians. docs/measurements.md ("Validation-split Taylor in the library")
has the figures for a 0.3 ms ResNet-20 on Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from onnxconet.latency.profile import Target, measure_isolated


def per_process_medians(cand: str, ref: str, pairs: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Each process's median ms, (candidate's, reference's), from one `measure_isolated` of `pairs` pairs."""
    rel = measure_isolated(cand, ref, Target(provider="cpu", threads=threads), pairs=pairs, seconds=0.5)
    c, r = rel.process_medians
    return np.asarray(c), np.asarray(r)


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
