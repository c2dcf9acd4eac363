"""Peak memory of one dmasking search step with K width options per group (FBNetV2's claim: flat in K).

    python tools/bench_dmasking_memory.py                       # digits CNN, batch 64, K = 4 and 16, CPU
    python tools/bench_dmasking_memory.py --options 2,4,8,16 --naive --device cuda

One search step = one weights step (SGD) and one logits step (Adam, task loss + expected-FLOPs hinge) of
`onnxconet.search.dmasking.step.search_step`, exactly what the search runs. Every K is measured in a fresh
subprocess (same model, same seeds, same batch), after one unmeasured warm-up step, so optimizer state and
allocator pools exist before the measured step.

What is measured:
  * CPU, "step peak": the largest amount of memory the step held *on top of* what was alive before it, from
    torch's CPU allocator as the profiler records it (`profile_memory=True`: one event per allocation and
    free, with its size; the peak is the maximum of the running sum over the step). This counts every tensor
    the step creates — activations saved for backward, masks, gradients, temporaries — and nothing else
    (Python objects and the interpreter are not tensors).
  * CPU, "peak RSS": the process's resident-set high-water mark (getrusage) at the end, a coarse cross-check
    that includes the interpreter, torch, onnx and the model (the same in every run).
  * CUDA (--device cuda): torch.cuda.max_memory_allocated() over the measured step minus the memory allocated
    before it.
With --naive, the same step is also measured with a naive mask, Σ_i w_i·(y ∘ 1_i), that keeps one masked copy
of every feature map per option for the backward: the growth that FBNetV2's staircase avoids, and a check that
the measurement sees such growth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

MODELS = {"digits": "models/digits_cnn.py:digits_cnn", "resnet20": "models/resnet_cifar.py:resnet20"}


def worker(args) -> dict:
    import copy

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from onnxconet.prepare import prepare
    from onnxconet.search.base import Objective
    from onnxconet.search.cost import CostModel
    from onnxconet.search.dmasking import DMaskingConfig, DMaskingStrategy
    from onnxconet.search.dmasking.step import SearchStep, search_step
    from onnxconet.search.masks import Supernet, width_options
    from onnxconet.space import WidthSpace

    torch.manual_seed(0)
    prep = prepare(MODELS.get(args.model, args.model))
    cg = prep.graph
    space = WidthSpace(cg, min_ratio=args.min_ratio)
    options = width_options(cg, space, args.k, align=1)
    counts = sorted({len(o) for o in options.values()})
    device = torch.device(args.device)
    model = prep.loaded.module.to(device).train()
    teacher = copy.deepcopy(model).eval()
    cost = CostModel(cg, space, "flops")
    strat = DMaskingStrategy(space, Objective(0.5), cost, DMaskingConfig(options=args.k, align=1))
    net_cls = NaiveSupernet if args.naive else Supernet
    net = net_cls(model, cg, options, cg.l1_scores()).to(device)
    net.attach()
    wopt = torch.optim.SGD([p for p in model.parameters()], lr=0.01, momentum=0.9, weight_decay=5e-4)
    aopt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=5e-4)
    shape = (args.batch, *prep.loaded.input_shape[1:])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device)
    xa = torch.randn(*shape, generator=gen).to(device)
    n_classes = cg.graph.shape(cg.graph.outputs[0])[-1]
    y = torch.randint(0, n_classes, (args.batch,), generator=gen).to(device)
    ya = torch.randint(0, n_classes, (args.batch,), generator=gen).to(device)

    s = SearchStep(net, model, teacher, wopt, aopt, strat.dm_cost, alpha=0.5, temperature=4.0)

    def step():
        return search_step(s, (x, y), (xa, ya), 5.0, gen)

    step()  # warm-up: optimizer state, allocator pools
    out = {"k": args.k, "options_per_group": counts, "groups": len(options), "sites": len(net.sites)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["step_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        with tempfile.TemporaryDirectory() as tmp:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            events = json.load(open(trace))["traceEvents"]
        sizes = [
            e["args"]["Bytes"]
            for e in sorted(events, key=lambda e: e.get("ts", 0))
            if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
        ]
        running = np.cumsum(sizes) if sizes else np.zeros(1)
        out["step_peak_bytes"] = int(max(0, running.max()))
        out["alloc_events"] = len(sizes)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _naive_supernet():
    import torch

    from onnxconet.search.masks import Supernet

    class Naive(Supernet):
        """Σ_i w_i·(y ∘ 1_i): K masked copies of the feature map per site (for comparison only)."""

        def set_weights(self, weights):
            self._w = weights
            super().set_weights(weights)

        def _mask(self, site, out):
            if not hasattr(self, "_bins"):
                self._bins = {}
            if site.module not in self._bins:
                rank_pos = self._index[site.module].cpu()
                bins = []
                for k, gid in enumerate(self.gids):
                    off = self._offsets[gid]
                    nb = getattr(self, f"_T{k}").shape[0]
                    sel = (rank_pos >= off) & (rank_pos < off + nb)
                    if sel.any():
                        r = rank_pos - off
                        for i, w in enumerate(self.options[gid]):
                            b = w // self.cg.groups[gid].divisor
                            m = torch.where(sel, (r < b).float(), torch.ones_like(r, dtype=torch.float32))
                            bins.append((gid, i, m.to(out.device)))
                self._bins[site.module] = bins
            shape = [1] * out.dim()
            shape[site.axis] = -1
            total = 0
            for gid, i, m in self._bins[site.module]:
                total = total + self._w[gid][i] * (out * m.view(shape))
            return total

    return Naive


NaiveSupernet = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--options", default="4,16")
    ap.add_argument("--min-ratio", type=float, default=0.125)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive", action="store_true", help="also measure the naive K-copies mask")
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.worker:
        global NaiveSupernet
        NaiveSupernet = _naive_supernet()
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for naive in [False, True] if args.naive else [False]:
        for k in [int(v) for v in args.options.split(",")]:
            cmd = [sys.executable, __file__, "--worker", "--k", str(k), "--model", args.model,
                   "--batch", str(args.batch), "--min-ratio", str(args.min_ratio), "--device", args.device]  # fmt: skip
            if naive:
                cmd.append("--naive")
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"worker K={k} failed:\n{r.stderr[-3000:]}")
            row = json.loads(line[7:]) | {"mask": "naive" if naive else "staircase"}
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    mib = 1 << 20
    print(
        f"model {args.model}, batch {args.batch}, device {args.device}; one search step = weights step + logits step"
    )
    print(
        f"{'mask':<10}{'K':>4}{'options/group':>15}{'sites':>7}{'step peak bytes':>17}{'MiB':>9}{'peak RSS MiB':>14}"
    )
    for r in rows:
        print(
            f"{r['mask']:<10}{r['k']:>4}{str(r['options_per_group']):>15}{r['sites']:>7}"
            f"{r['step_peak_bytes']:>17,}{r['step_peak_bytes'] / mib:>9.2f}{r['peak_rss_bytes'] / mib:>14.1f}"
        )
    for mask in ("staircase", "naive"):
        sel = [r for r in rows if r["mask"] == mask]
        if len(sel) >= 2:
            a, b = sel[0], sel[-1]
            d = (b["step_peak_bytes"] - a["step_peak_bytes"]) / a["step_peak_bytes"]
            rss = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / a["peak_rss_bytes"]
            print(
                f"{mask}: K={b['k']} vs K={a['k']}: step peak {100 * d:+.2f}%, peak RSS {100 * rss:+.1f}%"
                + ("  (< 15%: flat)" if mask == "staircase" and abs(d) < 0.15 else "")
            )


if __name__ == "__main__":
    main()
