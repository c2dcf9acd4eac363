"""The bench's teachers: the original network trained once per (model, data, seed) and cached with its accuracy.

    python tools/bench_teacher.py --model models/fashion_mnist.py:resnet20 --data fashion-mnist --seeds 0,1,2

(into OUT/teachers, where tools/bench_search.py --out OUT looks for them; the bench trains a missing one itself).

A teacher is `teacher_<model>_<data>_<seed>.pt` (a state_dict) next to a `.json` with its test and validation
accuracy, epochs, wall time and the commit that trained it; a finished teacher is reused. Teachers see the
whole training split (the user's trained model), whatever subset the searches train on.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import torch

from onnxconet.data import load_data, make_loaders
from onnxconet.prepare import prepare
from onnxconet.train.loop import TrainConfig, evaluate, fit


def code_version() -> str:
    """The commit of this checkout, with '+dirty' when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def teacher_path(out: Path, model: str, data: str, seed: int) -> Path:
    tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{Path(model.split(':')[0]).stem}-{model.split(':')[-1]}_{data}")
    return out / f"teacher_{tag.strip('-')}_{seed}.pt"


def teacher(model: str, data: str, seed: int, epochs: int, out: Path) -> tuple[str, dict]:
    """Train (or reuse) the teacher; returns its weights file and its record."""
    path = teacher_path(out, model, data, seed)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        return str(path), json.loads(meta_path.read_text())
    prep = prepare(model)
    splits = load_data(data, prep.loaded.input_shape, seed=seed)
    train, val, test = make_loaders(splits, 128, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fit(prep.loaded.module, train, TrainConfig(epochs=epochs, lr=0.05, alpha=0.0, seed=seed), val_loader=val)
    meta = {
        "model": model,
        "data": data,
        "seed": seed,
        "epochs": epochs,
        "train_samples": len(splits.train),
        "val_accuracy": evaluate(prep.loaded.module, val)["accuracy"],
        "test_accuracy": evaluate(prep.loaded.module, test)["accuracy"] if test is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "code": code_version(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(prep.loaded.module.state_dict(), path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return str(path), meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/fashion_mnist.py:resnet20")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fashion"), help="the bench's --out")
    args = ap.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        path, meta = teacher(args.model, args.data, seed, args.epochs, args.out / "teachers")
        print(
            f"{path}: test {100 * (meta['test_accuracy'] or 0):.2f} %  val {100 * meta['val_accuracy']:.2f} %  "
            f"{meta['epochs']} epochs  {meta['seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
