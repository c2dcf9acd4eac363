"""Widths by latency saliency (HALP: Shen et al., NeurIPS 2022): keep the channels with the most importance per
unit of predicted latency, under the budget.

Importance is first-order Taylor on the original (|w · dL/dw| summed over a channel's weights in every layer
the channel touches: producer, norm, consumers), comparable across layers because it is in units of the loss.
Latency is the run's cost model (the predictor calibrated on measured probes), so the widths follow what the
deployment measures: channels are cheap where onnxruntime runs them cheaply. HALP solves the knapsack exactly
per layer group; here a greedy pass widens, one move at a time, the group with the best importance gain per
predicted latency gain, until no move fits the budget. `search/sensitivity.py` gives the other importance:
each group's validation loss measured at each of its widths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from onnxconet.graph.groups import ChannelGraph
from onnxconet.space import WidthSpace


def taylor_scores(
    cg: ChannelGraph, model: torch.nn.Module, loader: Iterable, batches: int = 20
) -> np.ndarray:
    """Per-bundle importance: sum over the bundle's member weights of |w · dL/dw|, the gradient of the
    cross-entropy accumulated over the first `batches` batches of `loader` (the model in eval mode: its statistics
    stay). search/setup.py passes the validation split."""
    model = copy.deepcopy(model).cpu().eval()
    params = dict(model.named_parameters())
    model.zero_grad()
    for x, y in islice(loader, batches):
        F.cross_entropy(model(x), y).backward()
    scores = np.zeros(len(cg.group_of_bundle), dtype=np.float64)
    for m in cg.members.values():
        p = params.get(m.param)
        if p is None or p.grad is None:
            continue
        wg = (p.detach() * p.grad).abs().double().numpy()
        per_channel = np.moveaxis(wg, m.axis, 0).reshape(wg.shape[m.axis], -1).sum(axis=1)
        np.add.at(scores, cg.bundle_of_id[m.ids], per_channel)
    return scores


def taylor_gain(cg: ChannelGraph, space: WidthSpace, scores: np.ndarray) -> Callable[[int, int, int], float]:
    """gain(group, from width, to width): the per-bundle `scores` of the channels a step adds, the most important
    first within the group."""
    ranked = {g.id: np.sort(scores[cg.groups[g.id].bundles])[::-1] for g in space}
    div = {g.id: cg.groups[g.id].divisor for g in space}
    return lambda gid, a, b: float(ranked[gid][a // div[gid] : b // div[gid]].sum())


def knapsack_widths(
    cg: ChannelGraph,
    space: WidthSpace,
    gain: Callable[[int, int, int], float],
    predict: Callable[[dict[int, int]], float],
    budget: float,
    start: dict[int, int] | None = None,
) -> dict[int, int]:
    """From `start` (default: the smallest widths), widen the group whose move has the most gain per predicted
    cost, until no move fits under `budget`. A move takes a group from its width to any wider allowed one, not
    only the next step: a curve that is not concave (a residual branch at 4 channels may lose more than the
    branch removed; an NCHWc block boundary makes one step cost more than two) would stall a one-step greedy.
    `gain(group, from, to)`: `taylor_gain` or `sensitivity.curve_gain`."""
    options = {g.id: g.options() for g in space}
    widths = dict(start) if start is not None else space.smallest()
    cost = predict(widths)
    while True:
        best, best_value, best_cost = None, -np.inf, cost
        for g in space:
            w = widths[g.id]
            for to in (o for o in options[g.id] if o > w):
                nxt = {**widths, g.id: to}
                c = predict(nxt)
                if c > budget:
                    continue
                value = gain(g.id, w, to) / max(c - cost, 1e-6)
                if value > best_value:
                    best, best_value, best_cost = nxt, value, c
        if best is None:
            return widths
        widths, cost = best, best_cost
