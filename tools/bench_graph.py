"""Speed of the channel graph: export, group building, ONNX slicing (and Torch-Pruning's DepGraph when
installed, for comparison). Prints a table; figures go to the README.

    python tools/bench_graph.py                      # resnet50, densenet201 at 224
    python tools/bench_graph.py resnet18 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from onnxconet.graph.export import export_onnx
from onnxconet.graph.groups import ChannelGraph
from onnxconet.surgery.onnx import slice_onnx


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def torch_pruning_seconds(model, x, repeat: int) -> float | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return timed(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x), repeat)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["resnet50", "densenet201"])
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch threads {torch.get_num_threads()}, input 1x3x{args.res}x{args.res}, median of {args.repeat}"
    )
    print(
        f"{'model':<16}{'export s':>9}{'groups s':>9}{'model->groups s':>16}{'slice 50% s':>12}{'TP DepGraph s':>14}{'groups':>7}"
    )
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        t0 = time.perf_counter()
        proto = export_onnx(model, (1, 3, args.res, args.res), name=name)
        export_s = time.perf_counter() - t0
        groups_s, cg = timed(lambda proto=proto: ChannelGraph(proto), args.repeat)
        keep = cg.keep_mask(cg.uniform_widths(0.5))
        slice_s, _ = timed(lambda cg=cg, keep=keep: slice_onnx(cg, keep), args.repeat)
        tp_s = torch_pruning_seconds(model, torch.randn(1, 3, args.res, args.res), max(1, args.repeat // 2))
        tp_txt = f"{tp_s:>14.3f}" if tp_s is not None else f"{'(not installed)':>14}"
        print(
            f"{name:<16}{export_s:>9.2f}{groups_s:>9.3f}{export_s + groups_s:>16.2f}{slice_s:>12.3f}{tp_txt}{len(cg.groups):>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
