"""Weight inheritance across trials: a full-width weight bank that candidates are cut from and written
back to.

The bank starts as the original (teacher) weights. A candidate takes the bank's channels with the highest
group score (L1 of the bank's producer weights); after it is fine-tuned, its weights are written back at the
positions it kept, so a later candidate that grows a group again gets the original weights for the channels
that come back (never duplicated copies, which stay identical under SGD: CONetV2's flaw).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from onnxconet.graph.groups import ChannelGraph
from onnxconet.surgery.torch import Slices, slice_torch


def _put(full: torch.Tensor, ops: list[tuple[int, np.ndarray]], value: torch.Tensor) -> None:
    """full[kept positions along each axis in ops] = value (an outer product of index lists)."""
    if not ops:
        full.copy_(value)
        return
    axis, idx = ops[0]
    index = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=full.device)
    sub = full.index_select(axis, index)
    _put(sub, ops[1:], value)
    full.index_copy_(axis, index, sub)


class WeightBank:
    """Full-width weights plus the module structure to cut candidates from."""

    def __init__(self, module: nn.Module) -> None:
        self.template = copy.deepcopy(module).cpu().eval()
        self.state = {k: v.detach().clone().cpu() for k, v in self.template.state_dict().items()}

    def scores(self, cg: ChannelGraph) -> np.ndarray:
        """Per-bundle L1 of the bank's producer weights (the default keep order)."""
        weights = {k: v.float().numpy() for k, v in self.state.items() if v.is_floating_point()}
        return cg.l1_scores(weights)

    def cut(self, slices: Slices) -> nn.Module:
        """A new module holding the bank's weights at the kept positions."""
        self.template.load_state_dict(self.state)
        return slice_torch(self.template, slices)

    def absorb(self, slices: Slices, pruned: nn.Module) -> None:
        """Write a fine-tuned candidate's weights back at the positions it kept."""
        with torch.no_grad():
            for k, v in pruned.state_dict().items():
                if k not in self.state:
                    continue
                v = v.detach().cpu()
                ops = slices.get(k, [])
                if not ops:
                    if self.state[k].shape == v.shape:
                        self.state[k].copy_(v)
                    continue
                _put(self.state[k], sorted(ops, key=lambda t: t[0]), v.to(self.state[k].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) - set(state)
        if missing:
            raise KeyError(f"weight bank checkpoint lacks {sorted(missing)[:3]}")
        self.state = {k: state[k].clone() for k in self.state}

    def module(self) -> nn.Module:
        """The full-width model with the bank's weights."""
        self.template.load_state_dict(self.state)
        return copy.deepcopy(self.template)
