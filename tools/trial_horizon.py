"""Does a short trial rank widths as the final training does? Train width configurations from the original
(L1-chosen channels, BN recalibrated, distillation), each on several batch orders, for a short and a final number
of epochs; print validation/test accuracy per run as JSON lines.

    python tools/trial_horizon.py --teacher /tmp/bench/R/teacher_resnet_cifar_2.pt --seed 2 \
        --configs '{"uniform": [8,8,8,8,16,16,16,16,40,40,40,40], "searched": [8,16,16,8,24,8,16,8,32,32,40,24]}'

(the figures behind search/race.py and docs/measurements.md: ResNet-20 on digits, ~3 min on 2 cores). A teacher
is a state dict as tools/bench_search.py writes it (loaded with weights_only=True).
"""

from __future__ import annotations

import argparse
import json

import torch

from onnxconet.data import load_data, make_loaders
from onnxconet.prepare import prepare
from onnxconet.search.evaluate import reseed_loader
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train.loop import TrainConfig, evaluate, fit, recalibrate_bn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/resnet_cifar.py:resnet20")
    ap.add_argument("--teacher", required=True, help="state dict of the trained original")
    ap.add_argument("--seed", type=int, default=0, help="data split seed (the teacher's)")
    ap.add_argument("--configs", required=True, help="JSON {name: [width per searchable group, in id order]}")
    ap.add_argument("--epochs", default="2,6", help="short,final epochs")
    ap.add_argument("--orders", default="2,7,11", help="batch-order seeds")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
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
                model = bank.cut(cg.param_slices(cg.keep_mask(w, bank.scores(cg))))
                reseed_loader(train, order)
                recalibrate_bn(model, train, batches=10)
                fit(
                    model,
                    train,
                    TrainConfig(epochs=epochs, lr=args.lr, alpha=0.5, seed=order),
                    teacher=teacher,
                )
                v, t = evaluate(model, val), evaluate(model, test)
                row = {"config": name, "epochs": epochs, "order": order}
                row |= {"val": round(v["accuracy"], 4), "test": round(t["accuracy"], 4)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
