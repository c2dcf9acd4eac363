"""Latency measurement figures: cost of one measured candidate, repeatability, predictor quality, realized
speedup vs FLOPs. Prints tables; figures go to the README / the issue's closing note.

    python tools/bench_latency.py                                   # everything (slow: ~30 min on 2 cores)
    python tools/bench_latency.py --sections cost,speedup --seconds 1.5
    python tools/bench_latency.py --sections predictor --models resnet18 --configs 30 --threads 1,2
    python tools/bench_latency.py --sections repeat --repeats 5 --json out/bench_latency.json

Sections:
    cost       one measured candidate (a random width sample): slice + session creation + interleaved timing,
               next to re-exporting that candidate from torch (slice_torch + export_onnx)
    repeat     coefficient of variation over --repeats profiles: of the full model's median (separate
               `measure` calls) and of a 50%-width candidate's interleaved ratio to the full model
    predictor  calibrate a predictor on --probes measured candidates, then compare its predictions with
               --configs other random width samples, each measured --config-repeats times interleaved
               (median): Spearman, median |error|; also against a single measurement, and the retest
               (two single measurements against each other). The figures in docs/measurements.md:
               --sections predictor --models resnet18,mobilenet_v2 --threads 1 --fold-casts --align 8
    speedup    uniform pruning ratios 0.25 / 0.5 / 0.75: measured latency ratio vs FLOPs ratio
    deployed   the ratio onnxconet measures against the ratio as deployed, for every model at two widths (uniform
               0.5 and 0.25, aligned to 8) and every --threads: the in-loop ratio that drives the search
               (`PairedMeasurer`), the reported ratio (`measure_isolated`: the final check of a search,
               `profile --compare --isolated`), the previous in-loop method, and the oracle
               (tools/latency_oracle.py: each file alone in a plain onnxruntime process, 4 alternated pairs),
               --deployed-repeats times, the methods in turn within each repeat; errors against the oracle of
               the same repeat (median over repeats). Finished cells are kept in --cells (keyed by the latency
               code's version) and reused. The figures in docs/measurements.md:
               --sections deployed --threads 1,2 --seconds 2 (--busy 1: one busy process beside it)

Sections cost..speedup measure candidates the in-loop way (`measure_candidate`) on the CPU provider.
On a shared machine, other processes steal cores: with 2 intra-op threads a run's speed depends on whether
it got both cores, which moves ratios between repeats; 1 thread is far steadier (compare --threads 1,2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from onnxconet.graph.export import export_onnx, fold_castlike
from onnxconet.graph.groups import ChannelGraph
from onnxconet.latency.candidate import graph_info, measure_candidate, reference_source
from onnxconet.latency.predictor import calibrate, probe_widths
from onnxconet.latency.profile import Target, measure, physical_cores
from onnxconet.latency.runner import TimedSession
from onnxconet.prepare import prepare
from onnxconet.space import WidthSpace
from onnxconet.surgery.onnx import slice_onnx
from onnxconet.surgery.torch import slice_torch

ALL_SECTIONS = ("cost", "repeat", "predictor", "speedup", "deployed")
# --sections deployed: torchvision models at 224, the models/ networks at their own input
SPECS = {
    "digits": "models/digits_cnn.py:digits_cnn",
    "resnet20": "models/resnet_cifar.py:resnet20",
    "mbv2cifar": "models/mobilenetv2_cifar.py:mobilenetv2",
}


def _cv(xs: list[float]) -> float:
    return float(np.std(xs, ddof=1) / np.mean(xs)) if len(xs) > 1 else float("nan")


def _load(name: str, res: int, cache: dict, fold: bool = False):
    if name not in cache:
        t0 = time.perf_counter()
        prep = prepare(f"torchvision:{name}", None, (1, 3, res, res))
        note = ""
        if fold:
            model, n = fold_castlike(prep.onnx_model)
            prep = dataclasses.replace(prep, onnx_model=model, graph=ChannelGraph(model, prep.loaded.spec))
            note = f", {n} CastLike -> Cast"
        cache[name] = prep
        print(f"  [{name}: exported + groups in {time.perf_counter() - t0:.1f} s{note}]", flush=True)
    return cache[name]


def _uniform(cg: ChannelGraph, prune: float, align: int) -> dict[int, int]:
    """Every group at 1 - prune of its width (`uniform_widths`), or the nearest multiple of `align`."""
    if align <= 1:
        return cg.uniform_widths(prune)
    return WidthSpace(cg, min_ratio=0.01, align=align).uniform(1 - prune)


def section_cost(models, args, preps) -> list[dict]:
    print(f"\n(a) one measured candidate, {args.cost_threads} threads, timing cap {args.seconds} s")
    print(
        f"{'model':<16}{'end-to-end s':>13}{'slice s':>9}{'sessions s':>11}{'slice+sess s':>13}{'timing s':>10}"
        f"{'rounds':>7}{'ratio':>7}{'torch slice+export s':>21}"
    )
    rows = []
    target = Target(provider="cpu", threads=args.cost_threads)
    for name in models:
        prep = _load(name, args.res, preps, args.fold_casts)
        cg = prep.graph
        space = WidthSpace(cg, align=args.align)
        widths = space.sample(np.random.default_rng(123))
        ref = prep.onnx_model
        graph_info(cg)  # L1 scores + full FLOPs: once per model, like the search
        reference_source(ref)  # serialized + hashed once per model, like the search
        t0 = time.perf_counter()
        r = measure_candidate(cg, widths, ref, target, max_seconds=args.seconds)
        total = time.perf_counter() - t0
        # session creation, isolated (measure_candidate creates the same two sessions inside its timing)
        keep = cg.keep_mask(widths)
        cand = slice_onnx(cg, keep).SerializeToString()
        ref_bytes, _ = reference_source(ref)
        t1 = time.perf_counter()
        TimedSession(cand, {"provider": "cpu", "threads": target.threads})  # what a runner does on load
        TimedSession(ref_bytes, {"provider": "cpu", "threads": target.threads})
        sess = time.perf_counter() - t1
        # the alternative: rebuild the pruned torch model and export it
        t2 = time.perf_counter()
        pruned = slice_torch(prep.loaded.module, cg.param_slices(keep))
        export_onnx(pruned, prep.loaded.input_shape, name=f"{name}-pruned")
        reexport = time.perf_counter() - t2
        timing = r["measure_seconds"] - sess
        row = {
            "model": name,
            "end_to_end_s": total,
            "slice_s": r["slice_seconds"],
            "sessions_s": sess,
            "timing_s": timing,
            "rounds": r["rounds"],
            "ratio": r["ratio"],
            "torch_reexport_s": reexport,
        }
        rows.append(row)
        print(
            f"{name:<16}{total:>13.2f}{r['slice_seconds']:>9.3f}{sess:>11.3f}{r['slice_seconds'] + sess:>13.3f}"
            f"{timing:>10.2f}{r['rounds']:>7}{r['ratio']:>7.3f}{reexport:>21.2f}",
            flush=True,
        )
    return rows


def section_repeat(models, args, preps) -> list[dict]:
    print(f"\n(b) repeatability over {args.repeats} profiles (timing cap {args.seconds} s each)")
    print(
        f"{'model':<16}{'threads':>8}{'median ms (each profile)':>44}{'CV':>7}{'ratio @50% (each)':>38}{'CV':>7}"
    )
    rows = []
    for name in models:
        prep = _load(name, args.res, preps, args.fold_casts)
        cg = prep.graph
        widths = _uniform(cg, 0.5, args.align)
        for threads in args.threads:
            target = Target(provider="cpu", threads=threads)
            medians = [measure(prep.onnx_model.SerializeToString(), target, max_seconds=args.seconds).median_ms
                       for _ in range(args.repeats)]  # fmt: skip
            ratios = [
                measure_candidate(cg, widths, prep.onnx_model, target, max_seconds=args.seconds)["ratio"]
                for _ in range(args.repeats)
            ]
            row = {"model": name, "threads": threads, "medians_ms": medians, "cv_median": _cv(medians),
                   "ratios": ratios, "cv_ratio": _cv(ratios)}  # fmt: skip
            rows.append(row)
            print(
                f"{name:<16}{threads:>8}{' '.join(f'{m:.2f}' for m in medians):>44}{row['cv_median']:>7.1%}"
                f"{' '.join(f'{r:.3f}' for r in ratios):>38}{row['cv_ratio']:>7.1%}",
                flush=True,
            )
    return rows


def section_predictor(models, args, preps) -> list[dict]:
    print(
        f"\n(c) predictor: fitted on measured probes ({args.probes}), checked on {args.configs} other random width"
        f" samples, each measured {args.config_repeats} times (median; timing cap {args.seconds} s each)"
    )
    print(
        f"{'model':<16}{'threads':>8}{'measurements':>13}{'LOO err':>8}{'spearman':>9}{'median |err|':>13}"
        f"{'p90 |err|':>10}{'max |err|':>10}{'fit s':>7}{'predict µs':>11}{'ratio range':>12}"
        f"{'retest: spearman':>17}{'med |diff|':>11}{'vs single: sp':>14}{'med |err|':>10}{'remeasured':>11}"
    )
    rows = []
    for name in models:
        prep = _load(name, args.res, preps, args.fold_casts)
        cg = prep.graph
        space = WidthSpace(cg, align=args.align)
        for threads in args.threads:
            target = Target(provider="cpu", threads=threads)
            n = None if args.probes == "auto" else int(args.probes)
            pred, _ = calibrate(
                cg, prep.onnx_model, target, probe_widths(space, n, 0), max_seconds=args.seconds
            )
            rng = np.random.default_rng(1000)
            configs = [space.sample(rng) for _ in range(args.configs)]
            # "measured" = the median of --config-repeats independent measurements of each config (the
            # search confirms its best the same way); the first alone is reported too (single measurement)
            runs = [
                [
                    measure_candidate(cg, w, prep.onnx_model, target, max_seconds=args.seconds)["ratio"]
                    for w in configs
                ]
                for _ in range(args.config_repeats)
            ]
            measured = np.median(runs, axis=0).tolist()
            ev = pred.evaluate(configs, measured)
            retest = {}
            if len(runs) >= 2:  # how far two single measurements of the same configs agree
                a, b = np.asarray(runs[0]), np.asarray(runs[1])
                retest = {
                    "runs": runs,
                    "retest_spearman": float(spearmanr(a, b).statistic),
                    "retest_median_abs_diff": float(np.median(np.abs(a - b) / a)),
                    "vs_single": pred.evaluate(configs, runs[0]),
                }
            t0 = time.perf_counter()
            for w in configs:
                pred.predict_ratio(w)
            us = (time.perf_counter() - t0) / len(configs) * 1e6
            row = {"model": name, "threads": threads, "measurements": pred.report.measurements,
                   "loo_err": pred.report.loo_median_abs_err, **ev, "predict_us": us,
                   "measured": measured, "predicted": [float(pred.predict_ratio(w)) for w in configs],
                   "terms": pred.report.terms, **retest}  # fmt: skip
            rows.append(row)
            print(
                f"{name:<16}{threads:>8}{pred.report.measurements:>13}{pred.report.loo_median_abs_err:>8.1%}"
                f"{ev['spearman']:>9.3f}{ev['median_abs_err']:>13.1%}{ev['p90_abs_err']:>10.1%}"
                f"{ev['max_abs_err']:>10.1%}{pred.report.seconds:>7.2f}{us:>11.0f}"
                f"{f'{min(measured):.2f}-{max(measured):.2f}':>12}"
                + (
                    f"{retest['retest_spearman']:>17.3f}{retest['retest_median_abs_diff']:>11.1%}"
                    f"{retest['vs_single']['spearman']:>14.3f}{retest['vs_single']['median_abs_err']:>10.1%}"
                    f"{pred.report.remeasured:>11}"
                    if retest
                    else ""
                ),
                flush=True,
            )
    return rows


def section_speedup(models, args, preps) -> list[dict]:
    print(f"\n(d) realized speedup vs FLOPs at uniform pruning ratios ({args.cost_threads} threads)")
    print(
        f"{'model':<16}{'prune':>6}{'MACs ratio':>11}{'params ratio':>13}{'latency ratio':>14}{'p10-p90':>13}"
        f"{'speedup':>8}{'MACs speedup':>13}{'realized/ideal':>15}"
    )
    rows = []
    target = Target(provider="cpu", threads=args.cost_threads)
    for name in models:
        prep = _load(name, args.res, preps, args.fold_casts)
        cg = prep.graph
        for ratio in (0.25, 0.5, 0.75):
            r = measure_candidate(
                cg, _uniform(cg, ratio, args.align), prep.onnx_model, target, max_seconds=args.seconds
            )
            speed, ideal = 1 / r["ratio"], 1 / r["flops_ratio"]
            spread = f"{r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}"
            rows.append({"model": name, "prune": ratio, **{k: r[k] for k in (
                "flops_ratio", "params_ratio", "ratio", "ratio_p10", "ratio_p90", "latency_ms", "reference_ms")}})  # fmt: skip
            print(
                f"{name:<16}{ratio:>6.2f}{r['flops_ratio']:>11.3f}{r['params_ratio']:>13.3f}{r['ratio']:>14.3f}"
                f"{spread:>13}{speed:>8.2f}{ideal:>13.2f}{speed / ideal:>15.2f}",
                flush=True,
            )
    return rows


def _version() -> str:
    """Hash of the latency code and the oracle: a cell measured by other code is measured again."""
    import hashlib

    import onnxruntime as ort

    import onnxconet.latency.process as proc
    import onnxconet.latency.profile as prof
    import onnxconet.latency.runner as run

    h = hashlib.sha256(ort.__version__.encode())
    for f in (
        run.__file__,
        proc.__file__,
        prof.__file__,
        os.path.join(os.path.dirname(__file__), "latency_oracle.py"),
    ):
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


def _pair_files(name: str, folder: str) -> dict[str, tuple[str, str]]:
    """{"0.5": (candidate file, full file), "0.25": ...} for `name`, written once into `folder`."""
    full = os.path.join(folder, f"{name}_full.onnx")
    out = {s: (os.path.join(folder, f"{name}_{s}.onnx"), full) for s in ("0.5", "0.25")}
    if all(os.path.isfile(f) for pair in out.values() for f in pair):
        return out
    from onnxconet.graph.ir import save_onnx

    spec = SPECS.get(name, f"torchvision:{name}")
    prep = prepare(spec, None, None if name in SPECS else (1, 3, 224, 224))
    cg = prep.graph
    save_onnx(prep.onnx_model, full)
    space = WidthSpace(cg, min_ratio=0.125, align=8)
    for s, (path, _) in out.items():
        save_onnx(slice_onnx(cg, cg.keep_mask(space.uniform(float(s)))), path)
    return out


def _paired_error(row: dict, col: str) -> float:
    """Median over repeats of (the method's ratio / the oracle's ratio of the same repeat) - 1."""
    return float(np.median(np.divide(row[col], row["oracle"]))) - 1.0


def _spread(xs: list[float]) -> str:
    return f"{np.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def _deployed_cell(a: str, b: str, threads: int, args) -> dict:
    """Every method `args.deployed_repeats` times, the methods in turn within each repeat: on a shared VM the
    speed of 2 threads changes for minutes at a time (2 threads at 1-thread speed), so methods measured minutes
    apart would be compared across those phases; in turn, each repeat's methods see the same machine."""
    from latency_oracle import deployed_ratio, previous_inloop_ratio

    from onnxconet.latency.profile import PairedMeasurer, measure_isolated

    target = Target(provider="cpu", threads=threads)
    row: dict = {k: [] for k in ("oracle", "oracle_pairs", "oracle_ms", "reported", "reported_pairs",
                                 "reported_load", "inloop", "inloop_load", "inloop_disturbed", "previous")}  # fmt: skip
    with PairedMeasurer(b, target) as m:
        for _ in range(args.deployed_repeats):
            o = deployed_ratio(a, b, threads)
            row["oracle"].append(o["ratio"])
            row["oracle_pairs"].append(o["pair_ratios"])
            row["oracle_ms"].append([o["a_ms"], o["b_ms"]])
            rep = measure_isolated(a, b, target, seconds=0.5, max_pairs=8)  # as a search's decisions do
            row["reported"].append(rep.ratio)
            row["reported_pairs"].append(rep.ratios)
            row["reported_load"].append(rep.load)
            inl = m.compare(a, max_seconds=args.seconds)
            row["inloop"].append(inl.ratio)
            row["inloop_load"].append(inl.load)
            row["inloop_disturbed"].append(inl.disturbed)
            row["previous"].append(previous_inloop_ratio(a, b, threads, args.seconds))
    return row


def section_deployed(models, args, preps) -> list[dict]:
    version, r = _version(), args.deployed_repeats
    print(
        f"\n(e) measured vs as deployed (code {version}; {r} repeats of each; {args.busy} busy processes beside)"
        f"\n{'pair':<22}{'threads':>8}{'oracle (deployed)':>22}{'reported (isolated)':>26}{'in-loop':>22}"
        f"{'previous in-loop':>22}{'err rep':>9}{'err in':>8}{'err prev':>9}"
    )
    cells = {}
    if args.cells and os.path.isfile(args.cells):
        with open(args.cells) as f:
            for line in f:
                rec = json.loads(line)
                cells[json.dumps(rec["key"], sort_keys=True)] = rec["row"]
    folder = args.pairs_dir or os.path.join(os.path.expanduser("~/.cache/onnxconet"), "bench_pairs")
    os.makedirs(folder, exist_ok=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rows = []
    try:
        for name in models:
            for s, (a, b) in _pair_files(name, folder).items():
                for threads in args.threads:
                    key = {"pair": f"{name}@{s}", "threads": threads, "busy": args.busy, "version": version}
                    k = json.dumps(key, sort_keys=True)
                    if k not in cells:
                        cells[k] = _deployed_cell(a, b, threads, args)
                        cells[k].update(key)
                        if args.cells:
                            with open(args.cells, "a") as f:
                                f.write(json.dumps({"key": key, "row": cells[k]}) + "\n")
                    row = cells[k]
                    rows.append(row)
                    truth = float(np.median(row["oracle"]))
                    cells_ = [_spread(row[c]) for c in ("oracle", "reported", "inloop", "previous")]
                    errs = [
                        f"{np.median(row[c]) / truth - 1:+.1%}" for c in ("reported", "inloop", "previous")
                    ]
                    print(
                        f"{name + '@' + s:<22}{threads:>8}{cells_[0]:>22}{cells_[1]:>26}{cells_[2]:>22}"
                        f"{cells_[3]:>22}{errs[0]:>9}{errs[1]:>8}{errs[2]:>9}",
                        flush=True,
                    )
    finally:
        for p in busy:
            p.kill()
    for col in ("reported", "inloop", "previous"):  # each repeat against the oracle of the same repeat
        errs = [abs(_paired_error(r, col)) for r in rows]
        print(
            f"  {col}: max |error| {max(errs):.1%}, median {np.median(errs):.1%}, within 5 %: "
            f"{sum(e <= 0.05 for e in errs)}/{len(errs)}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sections", default=",".join(ALL_SECTIONS), help="comma list of " + ", ".join(ALL_SECTIONS)
    )
    ap.add_argument("--models", default=None, help="comma list of torchvision models (default per section)")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=1.5, help="timing cap of each measurement")
    ap.add_argument(
        "--threads", default="2", help="intra-op threads for repeat/predictor, comma list (e.g. 1,2)"
    )
    ap.add_argument("--cost-threads", type=int, default=2, help="intra-op threads for cost/speedup")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--probes",
        default="auto",
        help="measurements the predictor is fitted on: auto (groups + 8, 16..40) or N",
    )
    ap.add_argument(
        "--configs", type=int, default=30, help="random width samples the predictor is checked on"
    )
    ap.add_argument("--json", default=None, help="also write all rows to this JSON file")
    ap.add_argument("--deployed-repeats", type=int, default=3, help="deployed: repeats of every measurement")
    ap.add_argument("--busy", type=int, default=0, help="deployed: busy-loop processes running beside")
    ap.add_argument(
        "--cells", default="docs/cells/bench_latency_deployed.jsonl", help="deployed: finished cells"
    )
    ap.add_argument("--pairs-dir", default=None, help="deployed: where the pair files go (default: ~/.cache)")
    ap.add_argument(
        "--fold-casts",
        action="store_true",
        help="time the export with CastLike folded to Cast (what onnxruntime can fuse; see fold_castlike)",
    )
    ap.add_argument(
        "--align",
        type=int,
        default=1,
        help="widths in multiples of this (WidthSpace align; 16 = the AVX-512 NCHWc block, 8 on AVX2)",
    )
    ap.add_argument(
        "--config-repeats",
        type=int,
        default=3,
        help="predictor: independent measurements per checked config; the median is the measured latency",
    )
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in ALL_SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {ALL_SECTIONS}")
    torch.set_num_threads(2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import onnxruntime as ort

    print(
        f"onnxruntime {ort.__version__}, CPU provider, {physical_cores()} physical cores, input 1x3x{args.res}x"
        f"{args.res}, load average at start {load:.1f} (other processes share this machine: figures are noisy)"
    )
    preps: dict = {}
    defaults = {
        "cost": ["resnet18", "mobilenet_v2", "efficientnet_b0"],
        "repeat": ["resnet18", "mobilenet_v2", "efficientnet_b0"],
        "predictor": ["resnet18", "mobilenet_v2"],
        "speedup": ["resnet18", "mobilenet_v2", "efficientnet_b0"],
        "deployed": ["digits", "resnet20", "mbv2cifar", "resnet18", "mobilenet_v2", "efficientnet_b0"],
    }
    fns = {
        "cost": section_cost,
        "repeat": section_repeat,
        "predictor": section_predictor,
        "speedup": section_speedup,
        "deployed": section_deployed,
    }
    out: dict = {"args": vars(args), "load_start": load}
    for s in sections:
        models = args.models.split(",") if args.models else defaults[s]
        t0 = time.perf_counter()
        out[s] = fns[s](models, args, preps)
        print(
            f"  [{s}: {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.1f}]",
            flush=True,
        )
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
