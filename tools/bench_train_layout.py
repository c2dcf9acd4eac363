"""How much shorter `fit` is in the channels-last layout on this CPU: one model, the same data and distillation,
`TrainConfig.channels_last` off and on, alternated (the cores are shared), each run from the same copy.

    python tools/bench_train_layout.py models/fashion_mnist.py:resnet20 --data fashion-mnist \\
        --weights docs/cells/fashion/teacher_fashion-mnist-resnet20-fashion-mnist_0.pt --train-samples 20000
    python tools/bench_train_layout.py --epochs 5         # the built-in digits CNN on scikit-learn's digits

Prints one line per run and the ratio of each pair (on / off).
"""

from __future__ import annotations

import argparse
import copy

from onnxconet.data import load_data, make_loaders
from onnxconet.prepare import prepare
from onnxconet.train.loop import TrainConfig, evaluate, fit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="models/digits_cnn.py:digits_cnn")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--weights", default=None, help="the teacher's state_dict (default: the model as built)")
    ap.add_argument("--train-samples", type=int, default=None, help="a stratified training subset")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args(argv)
    prep = prepare(args.spec, weights=args.weights)
    shape = prep.loaded.input_shape
    splits = load_data(args.data, shape, seed=0, train_samples=args.train_samples)
    teacher = prep.loaded.module.eval()
    ratios = []
    for pair in range(args.pairs):
        seconds = {}
        for on in (False, True):
            train, val, _ = make_loaders(splits, 64, 0)  # the same batches in every run
            student = copy.deepcopy(teacher)
            cfg = TrainConfig(
                epochs=args.epochs, lr=0.05, alpha=0.5, temperature=4.0, seed=0, channels_last=on
            )
            seconds[on] = fit(student, train, cfg, teacher=teacher)["seconds"]  # fit's own wall time
            acc = evaluate(student, val)["accuracy"]
            print(f"pair {pair} channels_last={on}: fit {seconds[on]:.1f} s, val acc {acc:.4f}", flush=True)
        ratios.append(seconds[True] / seconds[False])
    print("on / off per pair:", " ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    main()
