"""Per-group loss curves, measured: the original's validation loss with one group cut to each of its allowed widths
(0 where its residual branch may go), every other group whole. The classic per-layer sensitivity analysis (Li et
al., "Pruning Filters for Efficient ConvNets", ICLR 2017), here on the channel groups the graph reads and in the
keep order the trials cut (the bank's L1), with the BatchNorm statistics re-estimated for each cut so the curve
measures the channels removed and not stale statistics.

Why measured and not Taylor: first-order Taylor scores one channel at a time at the original's weights, so the
loss of removing many channels, or a whole residual branch, is a sum of slopes; on Fashion-MNIST's ResNet-20 the
loss measured with each branch removed ranked the branches differently from Taylor's sums (layer3.1 first,
layer3.0 third; Taylor put layer3.0 first and layer1.0 sixth: docs/measurements.md, "Depth at 0.5").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from onnxconet.files import atomic_write
from onnxconet.graph.groups import ChannelGraph
from onnxconet.space import WidthSpace
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train.loop import evaluate, recalibrate_bn

Curves = dict[int, dict[int, float]]
CURVES = "loss_curves.json"  # in the run directory: what the placement used, and what --resume reuses
FORMAT = "onnxconet-loss-curves/1"


def loss_curves(
    cg: ChannelGraph,
    space: WidthSpace,
    bank: WeightBank,
    calibration: Iterable,
    validation: Iterable,
    *,
    calibration_batches: int = 10,
    device=None,
    progress: Callable[[int, int], None] | None = None,
) -> Curves:
    """{group id: {width: mean validation cross-entropy}} for every allowed width of every group in `space`, the
    other groups whole. `calibration` feeds the BatchNorm re-estimation (`calibration_batches` batches, the
    same ones for every cut when the loader's order is fixed); `validation` is read whole for each cut.
    `progress(done, total)` after each cut."""
    order = bank.scores(cg)
    full = space.full()
    cuts = [(g.id, w) for g in space for w in g.options()]
    curves: Curves = {g.id: {} for g in space}
    whole = _loss(cg, bank, full, order, calibration, validation, calibration_batches, device)
    for i, (gid, w) in enumerate(cuts):
        widths = {**full, gid: w}
        curves[gid][w] = (
            whole
            if w == full[gid]
            else _loss(cg, bank, widths, order, calibration, validation, calibration_batches, device)
        )
        if progress is not None:
            progress(i + 1, len(cuts))
    return curves


def _loss(cg, bank, widths, order, calibration, validation, batches, device) -> float:
    model = bank.cut(cg.param_slices(cg.keep_mask(widths, order)))
    recalibrate_bn(model, calibration, batches=batches, device=device)
    return float(evaluate(model, validation, device=device)["loss"])


def curve_gain(curves: Curves) -> Callable[[int, int, int], float]:
    """gain(group, from width, to width) for `knapsack_widths`: the loss the wider cut saves."""
    return lambda gid, a, b: curves[gid][a] - curves[gid][b]


def save_curves(path: Path, curves: Curves, cg: ChannelGraph) -> None:
    """`curves` as JSON (atomically), with the graph's fingerprint they belong to."""
    doc = {"format": FORMAT, "fingerprint": cg.fingerprint(),
           "curves": {str(g): {str(w): x for w, x in c.items()} for g, c in curves.items()}}  # fmt: skip
    atomic_write(path, json.dumps(doc, indent=1))


def load_curves(path: Path, cg: ChannelGraph, space: WidthSpace) -> Curves | None:
    """The curves saved at `path` when they are of this graph and cover exactly `space`'s widths, else None."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != FORMAT or doc.get("fingerprint") != cg.fingerprint():
            return None
        curves = {int(g): {int(w): float(x) for w, x in c.items()} for g, c in doc["curves"].items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    if curves.keys() != {g.id for g in space} or any(set(curves[g.id]) != set(g.options()) for g in space):
        return None
    return curves
