"""Does a short trial rank widths as the final training does? Train width configurations from the original
(L1-chosen channels, BN recalibrated, distillation), each on several batch orders, for a short and a final number
of epochs; print validation/test accuracy per run as JSON lines.

    python tools/trial_horizon.py --teacher /tmp/bench/R/teacher_resnet_cifar_2.pt --seed 2 \
        --configs '{"uniform": [8,8,8,8,16,16,16,16,40,40,40,40], "searched": [8,16,16,8,24,8,16,8,32,32,40,24]}'

(the figures behind search/race.py and docs/measurements.md: ResNet-20 on digits, ~3 min on 2 cores). A teacher
is a state dict as tools/bench_search.py writes it (loaded with weights_only=True).

With --run DIR (a finished search): the widths of up to --top of its complete trials (distinct widths), each
trained from the original for --final-epochs on the run's data and training subset; prints each trial's search
score next to its final test accuracy and the rank correlation between them (Kendall's tau, scipy). Beside the
trial score it ranks the same widths by the signal the default strategy uses instead of trials (`--importance
path`): the validation loss of the original cut to those widths, BatchNorm re-estimated, no training (the
library's `sensitivity.cut_loss` on the batches `search/setup.py` gives it: 10 shuffled training batches, the
validation split's first CURVE_IMAGES images); lower loss should mean higher final accuracy, so its tau is taken
against minus the loss. The tau of the trials' in-loop latency ratio is the control (what budget use alone ranks):

    python tools/trial_horizon.py --run runs/bench_fashion/runs/resnet20_0.3_anneal_0 --final-epochs 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scipy.stats import kendalltau

from onnxconet.data import load_data, make_loaders
from onnxconet.files import append_jsonl
from onnxconet.prepare import prepare
from onnxconet.search.driver import History
from onnxconet.search.evaluate import reseed_loader
from onnxconet.search.sensitivity import cut_loss
from onnxconet.search.setup import loss_batches
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train.loop import TrainConfig, evaluate, fit, recalibrate_bn


def train_widths(bank: WeightBank, cg, widths: dict[int, int], train, teacher, tcfg: TrainConfig):
    """`widths` cut from `bank` (top-L1 channels), BN recalibrated, trained with distillation on `train` replayed
    from `tcfg.seed` (the same batches for every configuration of that seed)."""
    model = bank.cut(cg.param_slices(cg.keep_mask(widths, bank.scores(cg))))
    reseed_loader(train, tcfg.seed)
    recalibrate_bn(model, train, batches=10)
    fit(model, train, tcfg, teacher=teacher)
    return model


def run_mode(run: Path, final_epochs: int, top: int, lr: float, out: Path | None = None) -> dict:
    """Kendall's tau between a search's trial scores and the final test accuracy of the same widths. With `out`
    (JSON lines), each trial's row is appended when it is trained, and rows already there for the same trial and
    final epochs of this run are reused (a run stopped half-way loses no finished training; the file is read and
    written as a search's history.jsonl is)."""
    header, history = History(run / "history.jsonl").read()
    cfg = header["config"]
    trials, seen = [], set()
    for t in (r for r in history if r.get("state") == "complete"):
        key = json.dumps(t["widths"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            trials.append(t)
    trials = trials[:top]
    prep = prepare(cfg["model"], cfg["weights"], tuple(cfg["input_shape"]) if cfg["input_shape"] else None)
    cg, teacher = prep.graph, prep.loaded.module.eval()
    splits = load_data(
        cfg["data"], prep.loaded.input_shape, seed=cfg["seed"], train_samples=cfg.get("train_samples")
    )
    train, _, test = make_loaders(splits, cfg["batch_size"], cfg["seed"])
    bank = WeightBank(teacher)
    loss_of = cut_loss(cg, bank, *loss_batches(splits.train, splits.val, cfg["batch_size"], cfg["seed"]))
    saved = History(out).read()[1] if out is not None and out.is_file() else []  # a cut last line is skipped
    done = {
        r["trial"]: r for r in saved if r.get("run") == str(run) and r.get("final_epochs") == final_epochs
    }
    rows = []
    for t in trials:
        if t["trial"] in done:
            rows.append(done[t["trial"]])
            print(json.dumps(done[t["trial"]]), flush=True)
            continue
        w = {int(k): v for k, v in t["widths"].items()}
        row = {"kind": "trial", "run": str(run), "trial": t["trial"], "search_accuracy": round(t["accuracy"], 4),
               "ratio": round(t["ratio"], 4)}  # fmt: skip
        row["cut_loss"] = round(loss_of(w), 4)
        tcfg = TrainConfig(epochs=final_epochs, lr=lr, alpha=cfg["alpha"], seed=cfg["seed"])
        model = train_widths(bank, cg, w, train, teacher, tcfg)
        row["final_test"] = round(evaluate(model, test)["accuracy"], 4)
        row["final_epochs"] = final_epochs
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            append_jsonl(out, row)
    final = [r["final_test"] for r in rows]
    tau = kendalltau([r["search_accuracy"] for r in rows], final)
    tau_loss = kendalltau([-r["cut_loss"] for r in rows], final)
    tau_ratio = kendalltau([r["ratio"] for r in rows], final)  # the control: how much is only budget use
    summary = {"kind": "summary", "run": str(run), "trials": len(rows), "final_epochs": final_epochs,
               "kendall_tau": tau.statistic, "p_value": tau.pvalue, "kendall_tau_cut_loss": tau_loss.statistic,
               "p_value_cut_loss": tau_loss.pvalue, "kendall_tau_ratio": tau_ratio.statistic}  # fmt: skip
    print(json.dumps(summary), flush=True)
    if out is not None:
        append_jsonl(out, summary)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished search folder: rank correlation of its trials")
    ap.add_argument("--final-epochs", type=int, default=8)
    ap.add_argument("--top", type=int, default=8, help="--run: at most this many distinct trials")
    ap.add_argument("--out", type=Path, help="--run: JSON lines to append each row to (and reuse rows from)")
    ap.add_argument("--model", default="models/resnet_cifar.py:resnet20")
    ap.add_argument("--teacher", help="state dict of the trained original")
    ap.add_argument("--seed", type=int, default=0, help="data split seed (the teacher's)")
    ap.add_argument("--configs", help="JSON {name: [width per searchable group, in id order]}")
    ap.add_argument("--epochs", default="2,6", help="short,final epochs")
    ap.add_argument("--orders", default="2,7,11", help="batch-order seeds")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    if args.run:
        run_mode(args.run, args.final_epochs, args.top, args.lr, args.out)
        return
    if not args.teacher or not args.configs:
        ap.error("--teacher and --configs are needed without --run")
    prep = prepare(args.model)
    cg, teacher = prep.graph, prep.loaded.module
    teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
    teacher.eval()
    train, val, test = make_loaders(
        load_data("digits", prep.loaded.input_shape, seed=args.seed), 64, args.seed
    )
    bank = WeightBank(teacher)
    ids = [g.id for g in cg.prunable]
    for name, widths in json.loads(args.configs).items():
        w = dict(zip(ids, widths, strict=True))
        for epochs in (int(e) for e in args.epochs.split(",")):
            for order in (int(b) for b in args.orders.split(",")):
                tcfg = TrainConfig(epochs=epochs, lr=args.lr, alpha=0.5, seed=order)
                model = train_widths(bank, cg, w, train, teacher, tcfg)
                v, t = evaluate(model, val), evaluate(model, test)
                row = {"config": name, "epochs": epochs, "order": order}
                row |= {"val": round(v["accuracy"], 4), "test": round(t["accuracy"], 4)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
