"""Widths by latency saliency (HALP: Shen et al., NeurIPS 2022): keep the channels with the most importance per
unit of predicted latency, under the budget.

Importance is first-order Taylor on the original (|w · dL/dw| summed over a channel's weights in every layer
the channel touches: producer, norm, consumers), comparable across layers because it is in units of the loss.
Latency is the run's cost model (the predictor calibrated on measured probes), so the widths follow what the
deployment measures: channels are cheap where onnxruntime runs them cheaply. HALP solves the knapsack exactly
per layer group; here a greedy pass adds one width step at a time to the group with the best importance gain
per predicted latency gain, until no step fits the budget.
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


def knapsack_widths(
    cg: ChannelGraph,
    space: WidthSpace,
    scores: np.ndarray,
    predict: Callable[[dict[int, int]], float],
    budget: float,
    start: dict[int, int] | None = None,
) -> dict[int, int]:
    """From `start` (default: the smallest widths), add the width step with the most importance per predicted
    cost until none fits under `budget`. Within a group the most important channels come first (the gain of a
    step is the sum of the next-best bundles' scores)."""
    ranked = {g.id: np.sort(scores[cg.groups[g.id].bundles])[::-1] for g in space}
    div = {g.id: cg.groups[g.id].divisor for g in space}
    widths = dict(start) if start is not None else space.smallest()
    cost = predict(widths)
    while True:
        best, best_value, best_cost = None, -np.inf, cost
        for g in space:
            w = widths[g.id]
            if w >= g.hi:
                continue
            nxt = {**widths, g.id: g.up(w)}
            c = predict(nxt)
            if c > budget:
                continue
            gain = float(ranked[g.id][w // div[g.id] : nxt[g.id] // div[g.id]].sum())
            value = gain / max(c - cost, 1e-6)
            if value > best_value:
                best, best_value, best_cost = nxt, value, c
        if best is None:
            return widths
        widths, cost = best, best_cost
