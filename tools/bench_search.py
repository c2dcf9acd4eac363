"""The search against the peers a user would pick instead, at the same deployed-latency budget and training epochs.

    pip install -e '.[bench]'                      # torch-pruning, for the tp-* peers
    apt-get install dataset-fashion-mnist          # the real data (Debian)
    python tools/bench_search.py                   # ResNet-20 on Fashion-MNIST, budgets 0.5/0.3, 3 seeds
    python tools/bench_search.py --budgets 0.3 --strategies default,l1,tp-magnitude --seeds 1

Protocol (docs/measurements.md, "Search on Fashion-MNIST"):
- teachers: the model trained once per seed on the whole training split (tools/bench_teacher.py), cached;
- every strategy starts from that teacher and trains the same total epochs (--trials x --epochs-per-trial of
  search + --final-epochs of final fine-tuning) with distillation from it, on the same training subset
  (--train-samples, stratified) and the same batches; the test set is the full official 10,000 images;
- the budget is a ratio of the teacher's latency *as deployed* (each file alone in its own process, medians of
  alternated pairs) at --threads; a run whose final file re-measures over the budget counts as missed;
- strategies: default (what `onnxconet search` runs unless told: its default strategy with that strategy's
  defaults, config.strategy_defaults; the knapsack on the loss path, --depth, one trial), anneal (CONetV2's metric
  and simulated annealing), anneal:knapsack (anneal --start knapsack), knapsack (the uniform widths
  on the budget, the budget they leave filled by latency saliency, placed on the measured cost, l1's protocol),
  knapsack:smallest (HALP's own fill from every group's minimum), a "+depth" suffix on a library strategy
  (knapsack:smallest+depth: residual branches may be removed, search --depth), a "+loss" suffix (search
  --importance loss: the knapsack's importance is each group's measured validation loss curve; +path: --importance
  path, the widths walked down from the whole network one measured cut at a time), dmasking, l1 (uniform widths, top-L1 channels), random (best of
  --trials random widths), scratch (uniform widths re-initialized), tp-magnitude / tp-groupnorm (Torch-Pruning,
  global pruning, its ratio bisected onto the budget as deployed, then fine-tuned the same epochs), and
  winner-scratch (the default strategy's shipped widths trained from re-initialized weights: Liu et al. 2019).

Each (model, budget, strategy, seed) is a cell saved as JSON under --out/cells, keyed by the code version (the
git tree of onnxconet/ and models/): a rerun reuses the finished cells of the same code and configuration, so
the bench continues across sessions; cells of other code versions are never mixed into a table. The tables
(Markdown and JSON) are written to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_teacher import code_version, teacher  # noqa: E402

from onnxconet.commands.search import SearchConfig, run_search  # noqa: E402
from onnxconet.data import load_data, make_loaders  # noqa: E402
from onnxconet.graph.export import export_onnx  # noqa: E402
from onnxconet.graph.groups import ChannelGraph  # noqa: E402
from onnxconet.graph.stats import count_flops, count_params  # noqa: E402
from onnxconet.latency.profile import Target, measure_isolated  # noqa: E402
from onnxconet.prepare import prepare  # noqa: E402
from onnxconet.search.config import DEFAULT_STRATEGY, config_json, strategy_defaults  # noqa: E402
from onnxconet.search.setup import reinit_bank  # noqa: E402
from onnxconet.train.loop import TrainConfig, evaluate, fit, recalibrate_bn  # noqa: E402

MODELS = {
    "resnet20": "models/fashion_mnist.py:resnet20",
    "mobilenetv2": "models/fashion_mnist.py:mobilenetv2",
    "digits": "models/digits_cnn.py:digits_cnn",
}
SEARCHES = ("anneal", "dmasking", "random")  # strategies that use the trials to search
LIBRARY = ("anneal", "dmasking", "random", "l1", "scratch", "knapsack")
PEERS = ("l1", "random", "tp-magnitude", "tp-groupnorm")  # what a user would pick instead


def code_key() -> str:
    """The code the cells depend on: git's tree of onnxconet/ and models/ (+ a hash of their uncommitted diff)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    trees = "-".join(git("rev-parse", f"HEAD:{d}")[:10] for d in ("onnxconet", "models"))
    diff = git("diff", "HEAD", "--", "onnxconet", "models")
    return trees + (f"+{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else "")


def search_config(
    args, model: str, budget: str, strategy: str, seed: int, weights: str, out: Path
) -> SearchConfig:
    """The library run of a cell: equal total epochs (the uniform baselines fine-tune what the others search)."""
    settings = strategy_settings(args, strategy)
    return SearchConfig(
        model=MODELS.get(model, model), data=args.data, train_samples=args.train_samples, weights=weights,
        budget=budget, epochs_per_trial=args.epochs_per_trial,
        final_epochs=total_epochs(args) - settings["trials"] * args.epochs_per_trial, probes=args.probes,
        threads=args.threads, out=str(out), seed=seed, align=args.align,
        resume=(out / "history.jsonl").exists(), **settings,
    )  # fmt: skip


def strategy_settings(args, strategy: str) -> dict:
    """The SearchConfig fields a bench strategy name sets: strategy, its trials, start, depth, importance."""
    if strategy == "default":  # what `onnxconet search` runs unless told, with its strategy's settings
        return {"trials": strategy_defaults(DEFAULT_STRATEGY)["trials"]}
    # knapsack+depth = knapsack --depth; +loss = --importance loss; +path = --importance path
    strategy, *flags = strategy.split("+")
    unknown = set(flags) - {"depth", "loss", "path"}
    if unknown:
        raise SystemExit(
            f"bench_search: unknown strategy suffix +{' +'.join(sorted(unknown))}; use +depth, +loss or +path"
        )
    importance = next((f for f in ("path", "loss") if f in flags), "taylor")
    strategy, _, start = strategy.partition(":")  # anneal:knapsack = anneal --start knapsack
    # the placed strategies (l1, scratch, knapsack) land their widths as deployed before training; more than one
    # trial trains the same widths again and takes epochs from the final fine-tune
    trials = args.trials if strategy in SEARCHES else min(args.trials, args.baseline_trials)
    return dict(
        strategy=strategy,
        start=start or "uniform",
        trials=trials,
        depth="depth" in flags,
        importance=importance,
    )


def total_epochs(args) -> int:
    return args.trials * args.epochs_per_trial + args.final_epochs


def library_cell(args, model: str, budget: str, strategy: str, seed: int, weights: str) -> dict:
    out = args.out / "runs" / f"{model}_{budget}_{strategy.replace(':', '-').replace('+', '-')}_{seed}"
    cfg = search_config(args, model, budget, strategy, seed, weights, out)
    res = run_search(cfg).to_json()
    b = res["best"]
    return {
        "test_acc": b["test_accuracy"], "val_acc": b["accuracy"], "ratio": b["latency_ratio"],
        "met": bool(b["budget_met"]), "shipped": b.get("shipped", "search"), "macs_ratio": b["flops_ratio"],
        "params_ratio": b["params_ratio"], "seconds": res.get("seconds"), "widths": b["widths"],
        "search_trials": [
            {"trial": t["trial"], "accuracy": t.get("accuracy"), "ratio": t.get("ratio"), "widths": t["widths"]}
            for t in res["trials"] if t.get("state") == "complete"
        ],
        "run": str(out), "config": config_json(cfg),
    }  # fmt: skip


def _train(args, model, teacher_model, seed: int, input_shape: tuple) -> dict:
    """Fine-tune `model` exactly as a search's final network: distillation, the same epochs and batches."""
    splits = load_data(args.data, input_shape, seed=seed, train_samples=args.train_samples)
    train, val, test = make_loaders(splits, 64, seed)
    recalibrate_bn(model, train, batches=10, device="cpu")
    cfg = TrainConfig(epochs=total_epochs(args), lr=0.05, alpha=0.5, temperature=4.0, seed=seed)
    fit(model, train, cfg, teacher=teacher_model, val_loader=None)
    return {"val_acc": evaluate(model, val)["accuracy"], "test_acc": evaluate(model, test)["accuracy"]}


def tp_cell(args, budget: str, strategy: str, seed: int, weights: str) -> dict:
    from bench_tp import prune_to_budget

    t0 = time.perf_counter()
    prep = prepare(args.spec, weights=weights)
    shape = prep.loaded.input_shape
    teacher_model = prep.loaded.module.eval()
    pruned = prune_to_budget(
        teacher_model, shape, strategy.removeprefix("tp-"), float(budget), Target(threads=args.threads)
    )
    model = pruned.model
    scores = _train(args, model, teacher_model, seed, shape)
    final = export_onnx(model.eval(), shape)
    ratio = measure_isolated(
        final.SerializeToString(), export_onnx(teacher_model, shape).SerializeToString(),
        Target(threads=args.threads), pairs=4, max_pairs=8, seconds=0.5,
    ).ratio  # fmt: skip
    return {
        **scores, "ratio": ratio, "met": ratio <= float(budget), "shipped": "search",
        "macs_ratio": count_flops(ChannelGraph(final)) / count_flops(prep.graph),
        "params_ratio": count_params(ChannelGraph(final)) / count_params(prep.graph),
        "pruning_ratio": pruned.pruning_ratio, "bisection": pruned.steps,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def winner_scratch_cell(args, budget: str, seed: int, weights: str, winner: dict) -> dict:
    """The default strategy's shipped widths, re-initialized and trained the same epochs (Liu et al. 2019)."""
    t0 = time.perf_counter()
    prep = prepare(args.spec, weights=weights)
    cg = prep.graph
    bank = reinit_bank(prep.loaded.module, seed)
    keep = cg.keep_mask({int(k): v for k, v in winner["widths"].items()}, bank.scores(cg))
    model = bank.cut(cg.param_slices(keep))
    scores = _train(args, model, prep.loaded.module.eval(), seed, prep.loaded.input_shape)
    same = {k: winner[k] for k in ("ratio", "met", "macs_ratio", "params_ratio", "widths")}
    return {**scores, **same, "shipped": winner["shipped"], "seconds": time.perf_counter() - t0}


def run_cell(args, model: str, budget: str, strategy: str, seed: int, cells: dict) -> dict:
    """A cell's result: reused when this code and configuration already finished it, else run and saved."""
    weights, meta = teacher(
        MODELS.get(model, model), args.data, seed, args.teacher_epochs, args.out / "teachers"
    )
    key = {
        "model": model, "budget": budget, "strategy": strategy, "seed": seed, "code": args.code,
        "data": args.data, "train_samples": args.train_samples, "trials": args.trials,
        "epochs_per_trial": args.epochs_per_trial, "final_epochs": args.final_epochs, "threads": args.threads,
        "align": args.align, "probes": args.probes, "baseline_trials": args.baseline_trials, "teacher_test_acc": meta["test_accuracy"],
    }  # fmt: skip
    path = args.out / "cells" / f"{model}_{budget}_{strategy.replace(':', '-').replace('+', '-')}_{seed}.json"
    if path.is_file():
        cell = json.loads(path.read_text())
        if cell.get("key") == key:
            print(f"  (reused {path})", flush=True)
            return cell
    if strategy == "default" or strategy.partition("+")[0].partition(":")[0] in LIBRARY:
        result = library_cell(args, model, budget, strategy, seed, weights)
    elif strategy.startswith("tp-"):
        result = tp_cell(args, budget, strategy, seed, weights)
    elif strategy == "winner-scratch":
        result = winner_scratch_cell(args, budget, seed, weights, cells[(model, budget, args.default, seed)])
    else:
        raise SystemExit(f"unknown strategy {strategy!r}")
    cell = {"key": key, **result, "teacher_test_acc": meta["test_accuracy"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=1))
    return cell


def summarize(model: str, budget: str, strategy: str, runs: list[dict]) -> dict:
    acc = [100 * r["test_acc"] for r in runs]
    ratios = [r["ratio"] for r in runs]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    return {
        "model": model, "budget": float(budget), "strategy": strategy, "runs": len(runs),
        "acc": statistics.mean(acc), "acc_std": sd, "ratio": statistics.mean(ratios),
        "ratio_max": max(ratios), "met": sum(r["met"] for r in runs),
        "searched_shipped": sum(r.get("shipped") == "search" for r in runs),
        "macs": statistics.mean(r["macs_ratio"] for r in runs),
        "params": statistics.mean(r["params_ratio"] for r in runs),
        "minutes": statistics.mean((r.get("seconds") or 0) / 60 for r in runs),
        "teacher": statistics.mean(100 * r["teacher_test_acc"] for r in runs),
    }  # fmt: skip


def markdown(rows: list[dict], args) -> str:
    head = (
        "| model | budget | strategy | test acc % (mean ± std) | ratio as deployed (mean / max) | met | "
        "searched widths shipped | MACs kept | params kept | min / run |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"code {args.code}; data {args.data}, train subset {args.train_samples}, {total_epochs(args)} training "
        f"epochs per row (search trials x {args.epochs_per_trial} + final: up to {args.trials} + "
        f"{args.final_epochs}; fewer trials leave more final epochs), ORT threads {args.threads}",
        "",
        head,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['strategy']} | {r['acc']:.2f} ± {r['acc_std']:.2f} | "
            f"{r['ratio']:.3f} / {r['ratio_max']:.3f} | {r['met']}/{r['runs']} | {r['searched_shipped']}/{r['runs']} | "
            f"{r['macs']:.3f} | {r['params']:.3f} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--train-samples", type=int, default=20000, help="stratified training subset of the runs")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--budgets", default="0.3,0.5")
    ap.add_argument(
        "--strategies",
        default="default,l1,tp-magnitude,tp-groupnorm,random,dmasking,winner-scratch,scratch",
    )
    ap.add_argument("--default", default="default", help="the strategy winner-scratch takes its widths from")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs-per-trial", type=int, default=1)
    ap.add_argument("--final-epochs", type=int, default=8)
    ap.add_argument(
        "--baseline-trials",
        type=int,
        default=1,
        help="trials of l1/scratch/knapsack, whose widths are placed as deployed before training (the rest of "
        "the search epochs go to their final fine-tuning, as the default's)",
    )
    ap.add_argument(
        "--align",
        type=int,
        default=4,
        help="the search's --align; at 8, ResNet-20's 16-channel first stage cannot go under 8 and the smallest "
        "widths run at 0.38 of the teacher (1 thread): 0.3 is out of reach",
    )
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the deployment")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fashion"))
    args = ap.parse_args()
    args.code = code_key()
    torch.set_num_threads(2)
    print(f"code {args.code} (commit {code_version()})", flush=True)
    cells: dict = {}
    rows = []
    for model in args.models.split(","):
        args.spec = MODELS.get(model, model)
        for budget in args.budgets.split(","):
            for strategy in args.strategies.split(","):
                runs = []
                for seed in (int(s) for s in args.seeds.split(",")):
                    if strategy == "winner-scratch" and (model, budget, args.default, seed) not in cells:
                        continue
                    cell = run_cell(args, model, budget, strategy, seed, cells)
                    cells[(model, budget, strategy, seed)] = cell
                    runs.append(cell)
                    print(
                        f"{model} {budget} {strategy} seed {seed}: test {100 * cell['test_acc']:.2f} %  ratio "
                        f"{cell['ratio']:.3f} {'met' if cell['met'] else 'MISSED'}  shipped {cell['shipped']}",
                        flush=True,
                    )
                if runs:
                    rows.append(summarize(model, budget, strategy, runs))
                    (args.out / "bench_search.json").write_text(json.dumps(rows, indent=1))
                    (args.out / "bench_search.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
