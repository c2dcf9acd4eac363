"""Does CONetV2's metric track accuracy? Spearman correlation between the mean QC of a network's layers and
its test accuracy, over random width configurations briefly fine-tuned from the trained original.

    python tools/metric_correlation.py                       # digits CNN on digits, 20 configs
    python tools/metric_correlation.py --configs 30 --epochs 2 --model models/resnet_cifar.py:resnet20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from onnxconet.data import load_data, make_loaders
from onnxconet.prepare import prepare
from onnxconet.search.evaluate import Evaluator
from onnxconet.space import WidthSpace
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train.loop import TrainConfig, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: the digits CNN)")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per config")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    prep = prepare(args.model)
    cg = prep.graph
    splits = load_data(args.data, prep.loaded.input_shape, seed=args.seed)
    train, val, test = make_loaders(splits, 64, args.seed)
    teacher = prep.loaded.module
    fit(teacher, train, TrainConfig(epochs=args.pretrain_epochs, alpha=0.0, seed=args.seed))
    space = WidthSpace(cg, min_ratio=0.125)
    ev = Evaluator(
        cg,
        WeightBank(teacher),
        teacher,
        train,
        val,
        TrainConfig(epochs=args.epochs, seed=args.seed),
        judge=None,
        on="flops",
        metric="qc",
    )
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"{'config':>6}{'MACs':>7}{'mean QC':>9}{'test acc':>10}")
    for i in range(args.configs):
        widths = space.sample(rng)
        trial, model, _ = ev.run(i, widths)
        qc = float(np.mean(list(trial.metrics.values())))
        acc = evaluate(model, test)["accuracy"]
        rows.append((qc, acc, trial.flops_ratio))
        print(f"{i:>6}{trial.flops_ratio:>7.2f}{qc:>9.4f}{100 * acc:>9.1f}%", flush=True)
    qc, acc, flops = map(np.array, zip(*rows, strict=True))
    rho, p = spearmanr(qc, acc)
    rho_f, _ = spearmanr(flops, acc)
    print(
        f"\nSpearman(mean QC, test accuracy) = {rho:.3f} (p = {p:.3g}) over {len(rows)} configs; "
        f"for reference Spearman(MACs, test accuracy) = {rho_f:.3f}; {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
