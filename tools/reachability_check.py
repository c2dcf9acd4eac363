"""Repeat the search's reachability decision and compare it with the previous single in-loop figure.

    python tools/reachability_check.py RUN_DIR [--repeats 3] [--threads 2,1]

RUN_DIR is a finished run of the built-in default (`onnxconet search --out RUN_DIR`): its baseline.onnx is the
reference. The smallest allowed widths (every group at 1/8 of its channels, aligned to 8, as the search's
default) are measured as deployed the way the search decides reachability (`LatencyJudge.deployed`: 4-8
process pairs), --repeats times per thread count, beside the previous method's single in-loop figure
(tools/latency_oracle.py). Compare the printed ratios with what the search shipped (RUN_DIR/result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from latency_oracle import previous_inloop_ratio

from onnxconet.graph.ir import save_onnx
from onnxconet.latency.profile import Target
from onnxconet.prepare import prepare
from onnxconet.search.judge import LatencyJudge
from onnxconet.space import WidthSpace
from onnxconet.surgery.onnx import slice_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="2,1")
    args = ap.parse_args()
    baseline = os.path.join(args.run, "baseline.onnx")
    cg = prepare(None).graph
    smallest = WidthSpace(cg, min_ratio=0.125, align=8).smallest()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "smallest.onnx")
        save_onnx(slice_onnx(cg, cg.keep_mask(smallest)), path)
        for threads in (int(t) for t in args.threads.split(",")):
            judge = LatencyJudge(baseline, Target(threads=threads), 2.0)
            try:
                dep = [judge.deployed(path) for _ in range(args.repeats)]
            finally:
                judge.close()
            old = [previous_inloop_ratio(path, baseline, threads, 2.0) for _ in range(args.repeats)]
            print(
                f"threads {threads}: as deployed (the check now) {[round(d.ratio, 3) for d in dep]} "
                f"({[d.rounds for d in dep]} pairs); previous single in-loop {[round(x, 3) for x in old]}"
            )
    result = os.path.join(args.run, "result.json")
    if os.path.isfile(result):
        with open(result) as f:
            best = json.load(f)["best"]
        print(
            f"the search shipped {best['latency_ratio']:.3f} as deployed from wider widths (trial {best['trial']})"
        )


if __name__ == "__main__":
    main()
