"""The final race: a searched configuration replaces the search's starting widths only on evidence.

A short trial ranks widths badly: on ResNet-20 (digits, budget 0.5, one teacher) a searched configuration
reached 87 % validation accuracy after two epochs where the uniform widths reached 61 %, and over three batch
orders 84 vs 70 % — yet after the six final epochs the uniform widths were ahead, 97.0 vs 96.3 % test accuracy,
with each batch order moving a result by up to 2 points (docs/measurements.md). So when the search
only ranks widths (`--final-from original`), anneal's best trial does not simply win: it and the widths anneal
started from (the uniform widths on the budget) both get the full final training on the same batches, and the
challenger ships only if it is significantly more accurate on the validation set — an exact one-sided McNemar
test on the images one model gets right and the other wrong (Dietterich 1998: the test for two classifiers on
one test set), at level `alpha`. Otherwise the starting widths ship: the search never trades a sure baseline for
a difference the data cannot tell from noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from onnxconet.train.loop import primary_logits


@torch.no_grad()
def correct_mask(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> np.ndarray:
    """Per sample of `loader` (in its order): did `model`'s top-1 prediction match the label?"""
    model.to(device).eval()
    out = []
    for x, y in loader:
        pred = primary_logits(model(x.to(device))).argmax(1).cpu()
        out.append((pred == y.view(-1)).numpy())
    return np.concatenate(out) if out else np.zeros(0, bool)


@dataclass(frozen=True)
class RaceResult:
    anchor_accuracy: float
    challenger_accuracy: float
    only_challenger: int  # images only the challenger gets right
    only_anchor: int  # images only the anchor gets right
    p_value: float
    challenger_wins: bool

    def to_json(self) -> dict:
        return {
            "anchor_accuracy": round(self.anchor_accuracy, 4),
            "challenger_accuracy": round(self.challenger_accuracy, 4),
            "only_challenger": self.only_challenger,
            "only_anchor": self.only_anchor,
            "p_value": round(self.p_value, 4),
            "challenger_wins": self.challenger_wins,
        }


def mcnemar(anchor: np.ndarray, challenger: np.ndarray, alpha: float = 0.05) -> RaceResult:
    """Exact one-sided McNemar test of "the challenger is more accurate" on paired per-sample correctness."""
    if anchor.shape != challenger.shape:
        raise ValueError(f"paired results differ in length: {anchor.shape} vs {challenger.shape}")
    b = int(np.sum(challenger & ~anchor))
    c = int(np.sum(anchor & ~challenger))
    p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return RaceResult(
        float(anchor.mean()) if anchor.size else 0.0,
        float(challenger.mean()) if challenger.size else 0.0,
        b,
        c,
        float(p),
        bool(p < alpha),
    )
