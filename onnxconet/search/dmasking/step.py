"""One step of dmasking's supernet training: a weights step, then a logits step (package docstring).

Apart from the epoch loop (`supernet.py`) because it is the unit the method is defined by and measured at
(tools/bench_dmasking_memory.py times exactly this), and tests drive it on hand-made batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from onnxconet.search.dmasking.cost import DMaskingCost
from onnxconet.search.masks import Supernet
from onnxconet.search.resolution import resize
from onnxconet.train.distill import distillation_loss, primary_logits

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SearchStep:
    """What a search step works on: the supernet (logits, masks) over `model`, the teacher giving soft targets
    (None: labels only), the weights' and the logits' optimizers, the cost the logits pay (its `config.hard`
    says which steps see one-hot samples; its resolutions, whether the input size is searched) and the
    distillation's alpha and temperature."""

    net: Supernet
    model: nn.Module
    teacher: nn.Module | None
    wopt: torch.optim.Optimizer
    aopt: torch.optim.Optimizer | None
    cost: DMaskingCost
    alpha: float = 0.5
    temperature: float = 4.0
    # data-parallel (train/ddp.py): the weights step's model (DDP's wrapper; None: `model`), and what averages
    # the logits' gradients over the ranks (None: one process)
    forward: Callable[[torch.Tensor], object] | None = None
    average: Callable[[Iterable[nn.Parameter]], None] | None = None

    def distill(self, out: torch.Tensor, t_logits: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return distillation_loss(out, t_logits, y, self.alpha, self.temperature)

    def soft_targets(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None or self.alpha <= 0:
            return None
        return primary_logits(self.teacher(x)).float()


def search_step(
    s: SearchStep, batch: Batch, arch_batch: Batch | None, tau: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One search step: a weights step on `batch` (masks from a fresh Gumbel sample, no graph to the logits),
    then, given `arch_batch`, a logits step (task loss + cost term; the weights get no gradient).
    With searched resolutions, the weights step runs at one sampled resolution and the logits step takes the
    expectation over them (package docstring).
    Returns the detached (weights loss, logits loss or None, expected ratio or None)."""
    loss = _weights_step(s, batch, tau, generator)
    if arch_batch is None or s.aopt is None:
        return loss, None, None
    aloss, ratio = _logits_step(s, arch_batch, tau, generator)
    return loss, aloss, ratio


def _weights_step(s: SearchStep, batch: Batch, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    x, y = batch
    net, sizes = s.net, s.cost.sizes()
    with torch.no_grad():
        net.set_weights(net.sample(tau, generator, hard=s.cost.config.hard in ("weights", "both")))
        t_logits = s.soft_targets(x)
        if sizes:
            w = gumbel(net.logits["resolution"], tau, generator, hard=True)
            x = resize(x, sizes[int(w.argmax())])
    loss = s.distill(primary_logits((s.forward or s.model)(x)).float(), t_logits, y)
    s.wopt.zero_grad(set_to_none=True)
    loss.backward()
    s.wopt.step()
    net.set_weights(None)
    return loss.detach()


def _logits_step(
    s: SearchStep, arch_batch: Batch, tau: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    xa, ya = arch_batch
    net, sizes, hard = s.net, s.cost.sizes(), s.cost.config.hard
    wparams = [p for p in s.model.parameters() if p.requires_grad]
    for p in wparams:
        p.requires_grad_(False)
    try:
        net.set_weights(net.sample(tau, generator, hard=hard == "both"))
        with torch.no_grad():
            ta = s.soft_targets(xa)
        if sizes:
            rl = net.logits["resolution"]
            w = gumbel(rl, tau, generator, hard=hard == "both")
            task = sum(
                w[i] * s.distill(primary_logits(s.model(resize(xa, r))).float(), ta, ya)
                for i, r in enumerate(sizes)
            )
            ratio = s.cost.expected_ratio(net.probs(tau), net.options, torch.softmax(rl / tau, dim=0))
        else:
            task = s.distill(primary_logits(s.model(xa)).float(), ta, ya)
            ratio = s.cost.expected_ratio(net.probs(tau), net.options)
        aloss = s.cost.arch_loss(task, ratio)
        s.aopt.zero_grad(set_to_none=True)
        aloss.backward()
        if s.average is not None:
            s.average(net.parameters())
        s.aopt.step()
    finally:
        net.set_weights(None)
        for p in wparams:
            p.requires_grad_(True)
    return aloss.detach(), ratio.detach()


def gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator | None, hard: bool) -> torch.Tensor:
    """GumbelSoftmax(logits; τ) as `Supernet.sample` draws it (hard: one-hot forward, straight-through)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    soft = torch.softmax((logits - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))) / tau, dim=0)
    if not hard:
        return soft
    one = torch.zeros_like(soft)
    one[int(soft.detach().argmax())] = 1.0
    return one - soft.detach() + soft
