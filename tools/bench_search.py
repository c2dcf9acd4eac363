"""anneal vs the baselines at the same budget, data and training epochs; mean ± std over seeds.

    python tools/bench_search.py                                  # digits CNN + ResNet-20, budgets 0.5/0.3, 3 seeds
    python tools/bench_search.py --models digits --budgets 0.5 --seeds 1 --strategies anneal,l1 --trials 6

The current figures in docs/measurements.md — widths at equal final training (paired trials, every strategy's
widths cut from the original and fine-tuned 6 epochs; anneal pays its final race with 3 of its 8 trials;
~2.5 min per run, 48 runs ≈ 2 h on 2 cores):
    python tools/bench_search.py --models resnet20 --budgets 0.5 --strategies anneal,uniform,l1,random \
        --trials 8 --epochs-per-trial 2 --final-epochs 6 --final-from original --probes 6 --threads 1 \
        --pretrain-epochs 8
    (the same with --budgets 0.3 --align 4; and --models digits --budgets 0.5,0.3 --pretrain-epochs 4
     --max-batches 10)
and end to end at equal total epochs (--final-from trial, the default):
    python tools/bench_search.py --models digits --trials 5 --final-epochs 2 --pretrain-epochs 4 \
        --max-batches 5 --probes 6 --threads 1

A finished run whose result.json has the same configuration is reused, so a killed bench continues where it
stopped. Each cell is a full `onnxconet search` run (its directory under --out) from the same pretrained teacher per
(model, seed); the table reports the final test accuracy of the best candidate, its re-measured latency ratio,
how many runs met the budget as measured, and the search's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from onnxconet.commands.search import SearchConfig, run_search
from onnxconet.data import load_data, make_loaders
from onnxconet.prepare import prepare
from onnxconet.search.config import config_json
from onnxconet.train.loop import TrainConfig, fit

MODELS = {"digits": "models/digits_cnn.py:digits_cnn", "resnet20": "models/resnet_cifar.py:resnet20"}


def pretrain(spec: str, seed: int, args) -> str:
    """Train the original once per (model, seed); every strategy then starts from the same teacher."""
    path = args.out / f"teacher_{Path(spec.split(':')[0]).stem}_{seed}.pt"
    if not path.is_file():
        prep = prepare(spec)
        splits = load_data("digits", prep.loaded.input_shape, seed=seed)
        train, val, _ = make_loaders(splits, 64, seed)
        torch.manual_seed(seed)
        fit(
            prep.loaded.module,
            train,
            TrainConfig(epochs=args.pretrain_epochs, alpha=0.0, seed=seed),
            val_loader=val,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(prep.loaded.module.state_dict(), path)
    return str(path)


def finished(out: Path, cfg: SearchConfig) -> dict | None:
    """The result of a run already finished in `out` with this configuration (a rerun bench skips it)."""
    path = out / "result.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    mine = {k: v for k, v in config_json(cfg).items() if k != "resume"}
    theirs = {k: v for k, v in res.get("config", {}).items() if k != "resume"}
    return res if all(theirs.get(k) == v for k, v in mine.items()) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,resnet20")
    ap.add_argument("--budgets", default="0.5,0.3")
    ap.add_argument("--strategies", default="anneal,dmasking,scratch,l1,random")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs-per-trial", type=int, default=1)
    ap.add_argument("--final-epochs", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument(
        "--final-from",
        choices=("trial", "original"),
        default="trial",
        help="trial: end to end at equal total epochs (l1/uniform get the search's epochs as fine-tuning); "
        "original: every strategy's widths cut from the original and fine-tuned --final-epochs (compares "
        "the widths found, as CONetV2/FBNetV2 retrain theirs)",
    )
    ap.add_argument("--budget-on", default="latency")
    ap.add_argument("--align", type=int, default=8, help="widths in multiples of this (the search's --align)")
    ap.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="batches per training epoch of the searches (default all; the teacher always sees all)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads of the latency target (0: all cores)",
    )
    ap.add_argument(
        "--probes", type=int, default=12, help="measured candidates the latency predictor is fitted on"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench_search"))
    args = ap.parse_args()
    rows = []
    teachers = {}
    print(
        f"{'model':<9}{'budget':>7} {'strategy':<8}{'test acc %':>16}{'ratio':>14}{'met':>5}{'search s':>10}",
        flush=True,
    )
    for model in args.models.split(","):
        for budget in args.budgets.split(","):
            for strategy in args.strategies.split(","):
                accs, ratios, secs, met, races, wins = [], [], [], 0, 0, 0
                for seed in range(args.seeds):
                    out = args.out / f"{model}_{budget}_{strategy}_{seed}"
                    # equal total epochs (final from the trial): uniform and l1 evaluate one configuration and
                    # fine-tune it as long as the others search. Equal final training (final from the
                    # original): every strategy gets the same trials (uniform/l1 use theirs to put the uniform
                    # widths on the budget as measured) and its widths --final-epochs from the original
                    searches = strategy in ("anneal", "random", "dmasking") or args.final_from == "original"
                    trials = args.trials if searches else 1
                    if strategy == "anneal" and args.final_from == "original":
                        # its final race may train a second configuration --final-epochs: paid for with
                        # trials, so anneal never trains more epochs than the others (search/race.py)
                        trials = max(2, args.trials - -(-args.final_epochs // args.epochs_per_trial))
                    extra = (args.trials - trials) * args.epochs_per_trial
                    weights = teachers.get((model, seed)) or pretrain(MODELS.get(model, model), seed, args)
                    teachers[(model, seed)] = weights
                    cfg = SearchConfig(
                        model=MODELS.get(model, model),
                        weights=weights,
                        strategy=strategy,
                        budget=budget,
                        budget_on=args.budget_on,
                        trials=trials,
                        epochs_per_trial=args.epochs_per_trial,
                        final_epochs=args.final_epochs + extra,
                        final_from=args.final_from,
                        pretrain_epochs=args.pretrain_epochs,
                        max_batches=args.max_batches,
                        probes=args.probes,
                        threads=args.threads,
                        out=str(out),
                        seed=seed,
                        align=args.align,
                        resume=(out / "history.jsonl").exists(),
                    )
                    t0 = time.perf_counter()
                    res = finished(out, cfg)
                    if res is None:
                        res = run_search(cfg).to_json()
                    else:
                        print(f"  (reused the finished run in {out})", flush=True)
                    b = res["best"]
                    accs.append(
                        100 * (b["test_accuracy"] if b["test_accuracy"] is not None else b["accuracy"])
                    )
                    ratios.append(
                        b["latency_ratio"] if args.budget_on == "latency" else b[f"{args.budget_on}_ratio"]
                    )
                    secs.append(res.get("seconds", time.perf_counter() - t0))
                    met += bool(b["budget_met"])
                    races += "race" in b
                    wins += bool(b.get("race", {}).get("challenger_wins"))
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                rsd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
                row = {
                    "model": model,
                    "budget": float(budget),
                    "strategy": strategy,
                    "acc": statistics.mean(accs),
                    "acc_std": sd,
                    "ratio": statistics.mean(ratios),
                    "ratio_std": rsd,
                    "met": met,
                    "runs": len(accs),
                    "seconds": statistics.mean(secs),
                    "races": races,
                    "race_wins": wins,
                }
                rows.append(row)
                print(
                    f"{model:<9}{budget:>7} {strategy:<8}{row['acc']:>9.1f} ± {sd:>4.1f}{row['ratio']:>8.3f} ± {rsd:.2f}"
                    f"{met:>3}/{len(accs)}{row['seconds']:>10.0f}"
                    + (f"   searched widths won {wins}/{races} races" if races else ""),
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_search.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
