"""Per-group loss curves, measured: the original's validation loss with one group cut to each of its allowed widths
(0 where its residual branch may go), every other group whole. The classic per-layer sensitivity analysis (Li et
al., "Pruning Filters for Efficient ConvNets", ICLR 2017), here on the channel groups the graph reads and in the
keep order the trials cut (the bank's L1), with the BatchNorm statistics re-estimated for each cut so the curve
measures the channels removed and not stale statistics.

Why measured and not Taylor: first-order Taylor scores one channel at a time at the original's weights, so the
loss of removing many channels, or a whole residual branch, is a sum of slopes; on Fashion-MNIST's ResNet-20 the
loss measured with each branch removed ranked the branches differently from Taylor's sums (layer3.1 first,
layer3.0 third; Taylor put layer3.0 first and layer1.0 sixth: docs/measurements.md, "Depth at 0.5").

The curves ignore interactions: each cut is measured with the other groups whole. `LossPath` measures every cut in
the network the cuts before it left: backward elimination on measured loss and predicted latency (NetAdapt: Yang
et al., ECCV 2018, without its per-step fine-tuning). On ResNet-20 at 0.3 the curves scored each first-stage
branch as cheap to remove alone, and the fill removed all three, leaving the 28×28 stage a single conv.
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
PATH = "loss_path.json"
PATH_FORMAT = "onnxconet-loss-path/1"


def loss_curves(
    space: WidthSpace,
    loss: Callable[[dict[int, int]], float],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Curves:
    """{group id: {width: mean validation cross-entropy}} for every allowed width of every group in `space`, the
    other groups whole. `loss(widths)` measures a cut (`cut_loss`: BatchNorm re-estimated on the same calibration
    batches for every cut, the same validation batches read whole). `progress(done, total)` after each cut."""
    full = space.full()
    cuts = [(g.id, w) for g in space for w in g.options()]
    curves: Curves = {g.id: {} for g in space}
    whole = loss(full)
    for i, (gid, w) in enumerate(cuts):
        curves[gid][w] = whole if w == full[gid] else loss({**full, gid: w})
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


def cut_loss(
    cg: ChannelGraph,
    bank: WeightBank,
    calibration: Iterable,
    validation: Iterable,
    *,
    calibration_batches: int = 10,
    device=None,
) -> Callable[[dict[int, int]], float]:
    """widths -> the validation loss of the cut: `bank` cut to the widths (the bank's channel order), BatchNorm
    re-estimated on `calibration_batches` of `calibration`, `validation` read whole (what `loss_curves` and
    `LossPath` measure)."""
    order = bank.scores(cg)
    return lambda widths: _loss(cg, bank, widths, order, calibration, validation, calibration_batches, device)


class LossPath:
    """Widths from whole to narrow, one measured step at a time: each step cuts the one group whose cut costs the
    least validation loss per predicted latency saved, every candidate measured (BatchNorm re-estimated, as the
    curves) in the network as the steps before left it. A group's candidate is its widest allowed width that
    saves at least `step` of the current predicted cost (its next width, 0 for a removable branch included, when
    none does). The path grows on demand: `place(budget)` extends it until a point is predicted within `budget`
    and returns the first such point, so placements at lower targets are further along one path (the deployed
    steering's response is monotone along it). `points`: [(widths, predicted cost when taken, loss)]."""

    def __init__(
        self,
        space: WidthSpace,
        loss: Callable[[dict[int, int]], float],
        predict: Callable[[dict[int, int]], float],
        *,
        step: float = 0.05,
        progress: Callable[[int, float], None] | None = None,
        points: list | None = None,
    ) -> None:
        """`loss(widths)`: the measured loss of a cut (`cut_loss`); `points`: a saved path to continue."""
        self.space, self.loss, self.predict, self.step, self.progress = space, loss, predict, step, progress
        self.evaluations = 0
        self.points = points or []
        if not self.points:
            full = space.full()
            self.points.append((full, predict(full), self._loss(full)))

    def _loss(self, widths: dict[int, int]) -> float:
        self.evaluations += 1
        return self.loss(widths)

    def _candidate(self, widths: dict[int, int], cost: float, gid: int) -> dict[int, int] | None:
        narrower = [o for o in self.space.groups[gid].options() if o < widths[gid]][::-1]  # widest first
        if not narrower:
            return None
        for o in narrower:
            cand = {**widths, gid: o}
            if cost - self.predict(cand) >= self.step * cost:
                return cand
        return {**widths, gid: narrower[0]}

    def extend(self) -> bool:
        """One more step; False when every group is at its narrowest."""
        widths, cost, loss = self.points[-1]
        best, best_score = None, float("inf")
        for g in self.space:
            cand = self._candidate(widths, cost, g.id)
            if cand is None:
                continue
            saved = cost - self.predict(cand)
            if saved <= 0:  # the predictor sees no saving: such a cut only loses accuracy
                continue
            c_loss = self._loss(cand)
            score = (c_loss - loss) / saved
            if score < best_score:
                best, best_score = (cand, cost - saved, c_loss), score
        if best is None:
            return False
        self.points.append(best)
        if self.progress is not None:
            self.progress(len(self.points) - 1, best[1])
        return True

    def place(self, budget: float) -> dict[int, int]:
        """The first widths on the path predicted within `budget`, refilled: the steps that led there are undone,
        the last first, each as far as the budget allows (the group it cut goes back to the widest width it cut
        through that fits). A step saves >= `step` of the cost, and one that removes a branch saves more: on
        ResNet-20 at 0.3, re-adding layer1.0's branch at 4 channels measured +0.085, so undoing the last step
        alone left 0.03 of a 0.291 target unused. The last point when none fits."""
        i = 0
        while True:
            while i < len(self.points):
                if self.predict(self.points[i][0]) <= budget:
                    return self._refill(i, budget)
                i += 1
            if not self.extend():
                return dict(self.points[-1][0])

    def _refill(self, i: int, budget: float) -> dict[int, int]:
        widths = dict(self.points[i][0])
        for k in range(i, 0, -1):
            before, after = self.points[k - 1][0], self.points[k][0]
            gid = next(g for g in after if after[g] != before[g])
            if widths[gid] != after[gid]:  # a later step's undo moved it already
                continue
            wider = [o for o in self.space.groups[gid].options() if after[gid] < o <= before[gid]]
            widths = next(
                ({**widths, gid: o} for o in reversed(wider) if self.predict({**widths, gid: o}) <= budget),
                widths,
            )
        return widths

    def save(self, path: Path, cg: ChannelGraph) -> None:
        doc = {"format": PATH_FORMAT, "fingerprint": cg.fingerprint(), "step": self.step,
               "points": [{"widths": {str(k): v for k, v in w.items()}, "predicted": c, "loss": x}
                          for w, c, x in self.points]}  # fmt: skip
        atomic_write(path, json.dumps(doc, indent=1))

    @staticmethod
    def saved_points(path: Path, cg: ChannelGraph, space: WidthSpace, step: float) -> list | None:
        """The points saved at `path` when they are of this graph, step and space, else None."""
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != PATH_FORMAT or doc.get("fingerprint") != cg.fingerprint():
                return None
            if doc.get("step") != step:
                return None
            points = [({int(k): int(v) for k, v in p["widths"].items()}, float(p["predicted"]), float(p["loss"]))
                      for p in doc["points"]]  # fmt: skip
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return None
        if not points or any(not space.contains(w) for w, _, _ in points):
            return None
        return points
