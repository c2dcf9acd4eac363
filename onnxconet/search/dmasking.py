"""`dmasking`: FBNetV2's DMaskingNAS on the channel groups, as a strategy of the search driver.

Phase 1, the supernet (once, before the first trial; `masks.Supernet`): the original at full width, one set of
logits per channel group over its width options, the group's channels multiplied by the staircase of
Gumbel-softmax weights (hooks, no change to the user's code). Weights (SGD, cosine) and logits (Adam, lr 0.01,
wd 5e-4) are updated in alternation, one step each, on disjoint seeded splits of the training data (80/20); the
logits stay frozen for the first `warmup` share of the epochs (the weights first learn to work at every width);
τ starts at 5 and is multiplied by 0.956 per epoch. Both steps use the search's distillation loss (soft targets
from the original, mixed with the labels).

One deliberate departure (`hard`, default "weights"): the weights step uses the *one-hot* of the Gumbel sample,
i.e. it trains one real sub-network per step drawn from the current distributions; the logits step keeps
FBNetV2's soft masks. FBNetV2 retrains the derived network from scratch, so soft-mask weights do not matter to
it; here the derived candidates inherit the supernet's weights and get one fine-tuning epoch. Measured on the
digits CNN (FLOPs budget 0.35, 6 supernet epochs, 1 fine-tuning epoch per candidate; validation accuracy of the
argmax / expected / sampled candidates): soft 57.6 / 98.9 / 38.7%, hard weights 97.4 / 97.8 / 97.0%. With soft
masks at τ >= 3 the weights never see a channel switched off, and a narrow candidate starts far from them.

Cost term (differentiable in the width distributions p_g = softmax(α_g / τ), i.e. without the Gumbel noise,
which only adds variance to an expectation):
  * --budget-on latency: `LatencyPredictor.expected_latency` of a predictor calibrated on this target (a few
    measured probes, `latency_predictor.json` in the run directory): exact E[ratio] of the fitted model under
    independent groups, which for a layer whose input and output widths are both searched is
    Σ_ij p_in,i p_out,j LUT(c_i, c_j).
  * --budget-on flops | params: FBNetV2's effective shapes (`EffectiveCost`): every weight's element count is a
    product of per-axis extents, each linear in the widths of the groups that axis carries; its expectation
    under independent groups is E[d0]·E[d1] + Σ_g n0_g n1_g Var(ρ_g), exact (it equals `count_flops` /
    `count_params` for one-hot distributions).

Loss of the logits step (`loss`):
  * "hinge" (default): task + penalty · max(0, E[ratio] / budget - 1). The search has a budget, and a hinge
    steers the expected cost onto it whatever the model's size; below the budget only accuracy counts (the
    search's own Objective is the same hinge). FBNet's multiplicative form has no budget in it: where the
    result lands depends on a and b, which were tuned for one phone's milliseconds.
  * "fbnet": task · a · log(LAT)^b (a = 0.2, b = 0.6) with LAT the expected latency in µs (or MMACs, or
    thousands of params), for comparison.

Phase 2, derivation (one trial per `ask`): trial 0 the argmax option of every group, trial 1 the expected width
under the final distributions, later trials samples from them; each is put onto the budget as predicted (one
scale factor for all groups, widths snapped to the group's grid: multiples of 8 where the group is wide enough,
else of its divisor) under `margin` × budget for latency (measurement noise; the margin is corrected by the
ratio measured / predicted of the trials told so far; and each candidate is measured before it is handed out:
over the budget, its prediction is scaled by measured / predicted and it is put back on the budget, `verify`).
The driver evaluates them like any candidate (cut from the supernet's weights keeping the channels in staircase
order, BN recalibrated, fine-tuned with distillation, measured); `run_search` finishes the best as for anneal.

Short searches: FBNetV2's logits learning rate (0.01) assumes ~10^5 logits steps; a search of a dozen epochs on
a small dataset takes a few hundred, and the logits move by well under 1 (digits CNN, 12 epochs: |α| <= 0.9, at
τ >= 3). The argmax is then a weak signal, which is why trial 1 (the expected width) and the samples exist; the
driver keeps the best feasible one. `arch_lr` is configurable.

Input resolution (`--resolutions`, FBNetV2's spatial search; `search/resolution.py` builds the per-resolution
graphs and costs): one more logits vector β over the resolutions, Gumbel-softmax with the same τ. The weights
step samples one resolution (hard) and resizes its batch to it (bilinear, align_corners=False); the teacher's
soft targets come from the batch as loaded (the original's own input). The logits step takes the expectation
over resolutions of the task loss, Σ_r w_r · L_r with w = GumbelSoftmax(β; τ) (one forward per resolution, all
under the same width masks: exact gradients for β, no straight-through noise on a choice that has few
options; one-hot forward with straight-through gradients under hard="both"). Cost: Σ_r p_r · scale_r ·
E_r[ratio] with p = softmax(β / τ), E_r the expected width cost on r's graph and scale_r its full-width cost
relative to the baseline at the model's own input shape (which the budget stays relative to). Derivation:
the argmax resolution r* (ties: the larger) is bound (`use_resolution`) and every derived candidate is put
on the budget with r*'s cost, measured sliced from r*'s graph; `run_search` trains, validates and exports at r*.

Resume: the supernet state (weights, logits, both optimizers, the logits' history) is checkpointed after every
epoch in `dmasking.pt`; a killed run continues at the next epoch, and once the supernet is done the derived
trials are replayed from the history without training anything.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from onnxconet.errors import OnnxconetError
from onnxconet.graph.analysis import Analyzer
from onnxconet.graph.groups import ChannelGraph
from onnxconet.search.base import Objective, Strategy, Trial, TrialState
from onnxconet.search.cost import CostModel
from onnxconet.search.masks import Supernet, width_grid, width_options
from onnxconet.space import WidthSpace
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train.distill import distillation_loss, primary_logits
from onnxconet.train.loop import resolve_device

log = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
CHECKPOINT = "dmasking.pt"
CHECKS = "dmasking_checks.json"
PREDICTOR = "latency_predictor.json"


# --------------------------------------------------------------------------------------- config
@dataclass
class DMaskingConfig:
    """Knobs of the strategy (`SearchConfig.dmasking` overrides them by name).

    Attributes:
        epochs: supernet epochs; None: the training the driver would spend on its trials
            (trials x epochs_per_trial), at least `min_epochs`.
        min_epochs: lower bound of the default above.
        options: at most this many width options per group (spread over the group's grid).
        align: options and derived widths are multiples of this where the group has >= 4 of them.
        tau0, tau_decay: Gumbel-softmax temperature at epoch e is tau0 * tau_decay**e.
        warmup: share of the epochs with the logits frozen.
        arch_lr, arch_wd: Adam for the logits.
        arch_split: share of the training data held out for the logits steps.
        loss: "hinge" or "fbnet" (see the module docstring); penalty, fbnet_a, fbnet_b their weights.
        margin: latency budgets are aimed at margin x budget (measurement noise).
        probes: measurements of the latency predictor (budget on latency).
        inherit: "supernet" (derived candidates start from the supernet's weights) or "original".
        sample_tau: temperature of the distributions sampled for trials >= 2 (None: the final τ).
        hard: which steps see hard (one-hot) Gumbel samples: "weights" (default: the weights step trains the
            sub-network of one sampled width per group; the logits step uses the soft masks, as FBNetV2),
            "both" (the logits step too, straight-through) or "none" (soft masks everywhere, as FBNetV2).
        verify: latency budgets: measure each derived candidate before handing it out and, while it measures
            over margin x budget, correct the prediction by measured / predicted and put it back on the budget
            (at most this many corrections; 0: trust the predictor).
        checkpoint: save the supernet state after every epoch (resume).
    """

    epochs: int | None = None
    min_epochs: int = 8
    options: int = 8
    align: int = 8
    tau0: float = 5.0
    tau_decay: float = 0.956
    warmup: float = 0.1
    arch_lr: float = 0.01
    arch_wd: float = 5e-4
    arch_split: float = 0.2
    loss: str = "hinge"
    penalty: float = 5.0
    fbnet_a: float = 0.2
    fbnet_b: float = 0.6
    margin: float = 0.95
    probes: int = 12
    inherit: str = "supernet"
    sample_tau: float | None = None
    hard: str = "weights"
    verify: int = 2
    checkpoint: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DMaskingConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise OnnxconetError(f"unknown dmasking option(s) {bad}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        problems = []
        if self.loss not in ("hinge", "fbnet"):
            problems.append(f"loss {self.loss!r} is not hinge or fbnet")
        if self.hard not in ("none", "weights", "both"):
            problems.append(f"hard {self.hard!r} is not none, weights or both")
        if self.inherit not in ("supernet", "original"):
            problems.append(f"inherit {self.inherit!r} is not supernet or original")
        if self.options < 2:
            problems.append(f"options must be >= 2, got {self.options}")
        if not 0 < self.arch_split < 1:
            problems.append(f"arch_split must be in (0, 1), got {self.arch_split}")
        if self.tau0 <= 0 or not 0 < self.tau_decay <= 1:
            problems.append(f"tau0 > 0 and tau_decay in (0, 1] needed, got {self.tau0}, {self.tau_decay}")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not 0 < self.margin <= 1:
            problems.append(f"margin must be in (0, 1], got {self.margin}")
        if problems:
            raise OnnxconetError("invalid dmasking config: " + "; ".join(problems))


# --------------------------------------------------------------------------------------- effective shapes
class EffectiveCost:
    """Expected FLOPs (MACs) or params ratio under independent per-group width distributions (FBNetV2's
    effective shapes), as a differentiable torch scalar; exact for the counting rules of `graph.stats`.

    Every counted tensor (a compute layer's weight times its output positions, or a float initializer) has
    an element count ``K · Π_a d_a(ρ)`` with ``d_a = c_a + Σ_g n_ag ρ_g`` the extent of a sliced axis (c_a fixed
    slots, n_ag slots of group g; ρ_g = width / channels). With m_g = E[ρ_g], v_g = Var(ρ_g):
    one sliced axis -> c + n·m; two -> (c0 + n0·m)(c1 + n1·m) + Σ_g n0_g n1_g v_g (exact). A tensor with more
    than two sliced axes (none in the supported ops) is approximated by the product of the expected extents.
    """

    def __init__(self, cg: ChannelGraph, on: str) -> None:
        if on not in ("flops", "params"):
            raise OnnxconetError(f"effective shapes count flops or params, not {on!r}")
        self.on = on
        self.gids = [g.id for g in cg.prunable]
        self.channels = np.array([g.channels for g in cg.prunable], dtype=np.float64)
        self._col = {gid: i for i, gid in enumerate(self.gids)}
        self._group_of_id = cg.group_of_bundle[cg.bundle_of_id]
        G = len(self.gids)
        terms: list[tuple[float, list[tuple[float, np.ndarray]]]] = []
        g = cg.graph
        if on == "flops":
            an = Analyzer(g)
            for node in g.iter_ops(("Conv", "ConvTranspose", "Gemm", "MatMul")):
                if len(node.inputs) < 2:
                    continue
                pa = an.param_axis(node.inputs[1], 0)
                if pa is None:
                    continue
                positions = _positions(g, node)
                if positions is not None:
                    terms.append(self._term(cg, pa[0], float(positions)))
        else:
            for name, t in g.initializers.items():
                if t.data_type in _FLOAT_TYPES:
                    terms.append(self._term(cg, name, 1.0))
        self.const = 0.0
        c0, a0, c1, a1, w = [], [], [], [], []
        self.approximated = 0
        for k, facs in terms:
            if not facs:
                self.const += k
                continue
            if len(facs) > 2:
                self.approximated += 1
                # fold the extra factors into the first at full width (approximation, see the docstring)
                extra = float(np.prod([c + n.sum() for c, n in facs[2:]]))
                facs = [facs[0], facs[1]]
                k *= extra
            f0 = facs[0]
            f1 = facs[1] if len(facs) == 2 else (1.0, np.zeros(G))
            c0.append(f0[0])
            a0.append(f0[1])
            c1.append(f1[0])
            a1.append(f1[1])
            w.append(k)
        self.C0, self.C1 = np.array(c0), np.array(c1)
        self.A0 = np.array(a0).reshape(-1, G)
        self.A1 = np.array(a1).reshape(-1, G)
        self.W = np.array(w)
        self.base = self.value(np.ones(G))
        self._torch: dict = {}

    def _term(self, cg: ChannelGraph, param: str, k: float) -> tuple[float, list[tuple[float, np.ndarray]]]:
        shape = cg.graph.shapes.get(param) or ()
        facs = []
        for axis, dim in enumerate(shape):
            m = cg.members.get((param, axis))
            if m is None:
                k *= dim
                continue
            n = np.zeros(len(self.gids))
            c = float(dim - np.asarray(m.ids).size)
            groups, counts = np.unique(self._group_of_id[np.asarray(m.ids).ravel()], return_counts=True)
            for gid, cnt in zip(groups.tolist(), counts.tolist(), strict=True):
                col = self._col.get(gid)
                if col is None:
                    c += cnt
                else:
                    n[col] += cnt
            if n.any():
                facs.append((c, n))
            else:
                k *= c
        return k, facs

    def value(self, rho: np.ndarray) -> float:
        """Count at relative widths `rho` (G,), deterministic."""
        return float(self.const + (self.W * (self.C0 + self.A0 @ rho) * (self.C1 + self.A1 @ rho)).sum())

    def ratio(self, widths: Mapping[int, int]) -> float:
        rho = np.ones(len(self.gids))
        for gid, wd in widths.items():
            col = self._col.get(int(gid))
            if col is not None:
                rho[col] = wd / self.channels[col]
        return self.value(rho) / self.base

    def expected_ratio(
        self, probs: Mapping[int, torch.Tensor], options: Mapping[int, Sequence[int]]
    ) -> torch.Tensor:
        """E[count] / count at full width, differentiable in `probs` (groups absent stay at full width)."""
        ref = next(iter(probs.values()))
        key = (ref.dtype, ref.device)
        if key not in self._torch:
            self._torch[key] = tuple(
                torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
                for a in (self.C0, self.A0, self.C1, self.A1, self.W, self.A0 * self.A1)
            )
        C0, A0, C1, A1, W, AA = self._torch[key]
        G = len(self.gids)
        m_parts, s_parts, idx = [], [], []
        for gid, p in probs.items():
            col = self._col[int(gid)]
            rho = torch.as_tensor(
                [w / self.channels[col] for w in options[gid]], dtype=ref.dtype, device=ref.device
            )
            p = p / p.sum()
            m_parts.append((p * rho).sum())
            s_parts.append((p * rho * rho).sum())
            idx.append(col)
        m = torch.ones(G, dtype=ref.dtype, device=ref.device)
        s = torch.ones(G, dtype=ref.dtype, device=ref.device)
        if idx:
            index = torch.as_tensor(idx, dtype=torch.long, device=ref.device)
            m = m.index_put((index,), torch.stack(m_parts))
            s = s.index_put((index,), torch.stack(s_parts))
        e = (W * ((C0 + A0 @ m) * (C1 + A1 @ m) + AA @ (s - m * m))).sum() + self.const
        return e / self.base


def _positions(g, node) -> float | None:
    """Output positions per output channel of a compute node (the rule of `graph.stats.count_flops`)."""
    if node.op == "Conv":
        out = g.shape(node.outputs[0])
        return float(np.prod(out)) / out[1] if out and None not in out else None
    if node.op == "ConvTranspose":
        x = g.shape(node.inputs[0])
        return float(np.prod(x)) / x[1] if x and None not in x else None
    a = g.shape(node.inputs[0])
    if not a or None in a:
        return None
    if node.op == "Gemm" and int(node.attr("transA", 0)):
        return float(a[1])
    return float(np.prod(a[:-1]))


# --------------------------------------------------------------------------------------- weights
class RankedBank(WeightBank):
    """A weight bank whose keep order is fixed (the supernet's staircase order), not re-read from its weights:
    a derived width then keeps exactly the channels the staircase kept alive the longest."""

    def __init__(self, module: nn.Module, scores: np.ndarray) -> None:
        super().__init__(module)
        self._scores = np.asarray(scores, dtype=np.float64).copy()

    def scores(self, cg: ChannelGraph) -> np.ndarray:
        return self._scores


def put_on_budget(
    widths: Mapping[int, float],
    target: float,
    predict: Callable[[dict[int, int]], float],
    snap: Callable[[int, float], int],
    iters: int = 24,
) -> tuple[dict[int, int], float]:
    """Scale every group of `widths` by one factor (snapped to allowed widths) so that the predicted ratio is
    as close to `target` as possible from below; returns (widths, log2 of the scale). When even the smallest
    allowed widths miss the target, those are returned."""
    lo, hi = -5.0, 5.0
    best = {g: snap(g, w * 2.0**lo) for g, w in widths.items()}
    best_s = lo
    if predict(best) > target:
        return best, lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        cand = {g: snap(g, w * 2.0**mid) for g, w in widths.items()}
        if predict(cand) <= target:
            best, best_s, lo = cand, mid, mid
        else:
            hi = mid
    return best, best_s


def search_step(
    strategy: DMaskingStrategy,
    net: Supernet,
    model: nn.Module,
    teacher: nn.Module | None,
    wopt: torch.optim.Optimizer,
    aopt: torch.optim.Optimizer | None,
    batch: tuple[torch.Tensor, torch.Tensor],
    arch_batch: tuple[torch.Tensor, torch.Tensor] | None,
    tau: float,
    generator: torch.Generator | None,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One search step: a weights step on `batch` (masks from a fresh Gumbel sample, no graph to the logits),
    then, given `arch_batch`, a logits step (task loss + cost term; the weights get no gradient).
    With searched resolutions, the weights step runs at one sampled resolution and the logits step takes the
    expectation over them (module docstring).
    Returns the detached (weights loss, logits loss or None, expected ratio or None)."""
    from onnxconet.search.resolution import resize

    wparams = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    hard = strategy.config.hard
    sizes = [r.size for r in strategy.resolutions] if strategy.resolutions else None
    with torch.no_grad():
        net.set_weights(net.sample(tau, generator, hard=hard in ("weights", "both")))
        t_logits = primary_logits(teacher(x)).float() if teacher is not None and alpha > 0 else None
        if sizes:
            w = _gumbel(net.logits["resolution"], tau, generator, hard=True)
            x = resize(x, sizes[int(w.argmax())])
    out = primary_logits(model(x)).float()
    loss = distillation_loss(out, t_logits, y, alpha, temperature)
    wopt.zero_grad(set_to_none=True)
    loss.backward()
    wopt.step()
    net.set_weights(None)
    if arch_batch is None or aopt is None:
        return loss.detach(), None, None
    xa, ya = arch_batch
    for p in wparams:
        p.requires_grad_(False)
    try:
        net.set_weights(net.sample(tau, generator, hard=hard == "both"))
        with torch.no_grad():
            ta = primary_logits(teacher(xa)).float() if teacher is not None and alpha > 0 else None
        if sizes:
            rl = net.logits["resolution"]
            w = _gumbel(rl, tau, generator, hard=hard == "both")
            task = sum(
                w[i]
                * distillation_loss(primary_logits(model(resize(xa, r))).float(), ta, ya, alpha, temperature)
                for i, r in enumerate(sizes)
            )
            ratio = strategy.expected_ratio(net.probs(tau), net.options, torch.softmax(rl / tau, dim=0))
        else:
            task = distillation_loss(primary_logits(model(xa)).float(), ta, ya, alpha, temperature)
            ratio = strategy.expected_ratio(net.probs(tau), net.options)
        aloss = strategy.arch_loss(task, ratio)
        aopt.zero_grad(set_to_none=True)
        aloss.backward()
        aopt.step()
    finally:
        net.set_weights(None)
        for p in wparams:
            p.requires_grad_(True)
    return loss.detach(), aloss.detach(), ratio.detach()


def _gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator | None, hard: bool) -> torch.Tensor:
    """GumbelSoftmax(logits; τ) as `Supernet.sample` draws it (hard: one-hot forward, straight-through)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    soft = torch.softmax((logits - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))) / tau, dim=0)
    if not hard:
        return soft
    one = torch.zeros_like(soft)
    one[int(soft.detach().argmax())] = 1.0
    return one - soft.detach() + soft


def _argmax_last(a) -> int:
    """Index of the largest value, the last one on ties (the larger resolution)."""
    a = np.asarray(a)
    return int(len(a) - 1 - np.argmax(a[::-1]))


# --------------------------------------------------------------------------------------- strategy
class DMaskingStrategy(Strategy):
    """FBNetV2's DMaskingNAS (see the module docstring). Needs `attach(evaluator, out)` before the first ask."""

    name = "dmasking"
    absorb = False  # every derived candidate is cut from the same supernet weights

    def __init__(
        self,
        space: WidthSpace,
        objective: Objective,
        cost: CostModel,
        config: DMaskingConfig | None = None,
        *,
        seed: int = 0,
        trials: int = 1,
        epochs_per_trial: int = 1,
    ) -> None:
        super().__init__(space, objective, seed)
        self.cost = cost
        self.cg = cost.cg
        self.on = cost.on
        self.config = config or DMaskingConfig()
        self.epochs = self.config.epochs or max(self.config.min_epochs, trials * epochs_per_trial)
        self.options = width_options(self.cg, space, self.config.options, self.config.align)
        self.grid = {g.id: width_grid(self.cg, space, g.id, self.config.align) for g in space}
        self.rng = np.random.default_rng(seed)
        self.evaluator = None
        self.out: Path | None = None
        self.progress: Callable[[str, dict], None] | None = None
        self.resume = False
        self.predictor = None
        self.effective = None if self.on == "latency" else EffectiveCost(self.cg, self.on)
        self.trained = False
        self.logits: dict[int, np.ndarray] = {}
        self.searched: list[int] = []
        self.skipped: dict[int, str] = {}
        self.logits_history: list[dict] = []
        self.summary: dict[str, Any] = {}
        self.asked: list[dict[int, int]] = []
        self.corrections: list[float] = []
        self.best_objective = -math.inf
        self.told = 0
        self._pending: dict[str, Any] = {}
        self._checks: dict[str, float] | None = None
        self.resolutions: list | None = None  # search/resolution.Resolution, ascending sizes
        self.resolution = None  # the bound one (after the supernet)
        self.res_logits: np.ndarray | None = None

    # ---- wiring
    def attach(self, evaluator, out: str | os.PathLike, progress=None, resume: bool = False) -> None:
        """Give the strategy what the supernet phase needs: the evaluator (channel graph, weight bank, teacher,
        loaders, training config, latency judge), the run directory, the progress callback."""
        self.evaluator = evaluator
        self.out = Path(out)
        self.progress = progress
        self.resume = resume

    def set_resolutions(self, resolutions: list) -> None:
        """Search the input resolution too (`search/resolution.Resolution`s with their costs bound)."""
        self.resolutions = sorted(resolutions, key=lambda r: r.size) or None

    def use_resolution(self, size: int) -> None:
        """Bind the resolution the derived candidates are cut, put on the budget and measured at."""
        res = next((r for r in self.resolutions or [] if r.size == int(size)), None)
        if res is None:
            raise OnnxconetError(
                f"resolution {size} is not one of the searched {[r.size for r in self.resolutions or []]}; "
                "use another --out"
            )
        self.resolution = res
        self.cg = res.cg
        self.summary["resolution"] = res.size

    def _emit(self, text: str) -> None:
        log.info("dmasking: %s", text)
        if self.progress:
            self.progress("stage", {"text": text})

    # ---- cost
    def _latency_predictor(self):
        from onnxconet.latency.predictor import LatencyPredictor, calibrate

        path = self.out / PREDICTOR if self.out else None
        if path is not None and path.is_file() and self.resume:
            try:
                pred = LatencyPredictor.load(path, self.cg)
                self._emit(f"latency predictor loaded from {path}")
                return pred
            except OnnxconetError as e:
                log.warning("%s: %s; calibrating a new one", path, e)
        judge = self.evaluator.judge if self.evaluator is not None else None
        if judge is None:
            raise OnnxconetError("dmasking with --budget-on latency needs latency measurements (a judge)")
        n = self.config.probes
        self._emit(f"calibrating the latency predictor on {n} measured candidates")
        t0 = time.perf_counter()
        pred, _ = calibrate(
            self.cg, judge.reference, judge.target, space=self.space, n=n, seed=self.seed,
            max_seconds=judge.max_seconds, measurer=judge.measurer,
        )  # fmt: skip
        self.summary["predictor_seconds"] = round(time.perf_counter() - t0, 1)
        self.summary["predictor_fit"] = {
            "measurements": pred.report.measurements,
            "loo_median_abs_err": pred.report.loo_median_abs_err,
            "loo_max_abs_err": pred.report.loo_max_abs_err,
        }
        if path is not None:
            pred.save(path)
        return pred

    def expected_ratio(
        self,
        probs: Mapping[int, torch.Tensor],
        options: Mapping[int, Sequence[int]],
        res_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """E[budgeted ratio] under the distributions `probs` (and `res_probs` over the searched resolutions;
        differentiable)."""
        if self.resolutions and res_probs is not None:
            parts = [
                p * r.scale
                * (r.predictor.expected_latency(probs, options, unit="ratio") if self.on == "latency"
                   else r.effective.expected_ratio(probs, options))
                for p, r in zip(res_probs, self.resolutions, strict=True)
            ]  # fmt: skip
            return torch.stack(parts).sum()
        if self.on == "latency":
            return self.predictor.expected_latency(probs, options, unit="ratio")
        return self.effective.expected_ratio(probs, options)

    def predict_raw(self, widths: Mapping[int, int], res=None) -> float:
        res = res or self.resolution
        if res is not None:
            cost = (
                res.predictor.predict_ratio(widths) if self.on == "latency" else res.effective.ratio(widths)
            )
            return float(cost) * res.scale
        if self.on == "latency":
            return float(self.predictor.predict_ratio(widths))
        return float(self.effective.ratio(widths))

    def correction(self) -> float:
        """Median measured / predicted latency ratio of the trials told so far (1 without any)."""
        if self.on != "latency" or not self.corrections:
            return 1.0
        return float(np.clip(np.median(self.corrections), 0.5, 2.0))

    def predict(self, widths: Mapping[int, int]) -> float:
        return self.predict_raw(widths) * self.correction()

    def target(self) -> float:
        return self.objective.budget * (self.config.margin if self.on == "latency" else 1.0)

    def arch_loss(self, task: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.loss == "hinge":
            return task + c.penalty * torch.relu(ratio / self.objective.budget - 1.0)
        if self.on == "latency":
            pred, scale = self.predictor, 1.0
            if pred is None and self.resolutions:
                pred, scale = self.resolutions[-1].predictor, self.resolutions[-1].scale
            unit = pred.reference_ms / scale * 1000.0  # µs of the baseline
        elif self.on == "flops":
            unit = self.effective.base / 1e6  # MMACs
        else:
            unit = self.effective.base / 1e3  # thousands of params
        lat = torch.clamp(ratio * unit, min=math.e)
        return task * c.fbnet_a * torch.log(lat) ** c.fbnet_b

    # ---- the supernet phase
    def _checkpoint_path(self) -> Path | None:
        return self.out / CHECKPOINT if self.out is not None and self.config.checkpoint else None

    def _load_checkpoint(self) -> dict | None:
        from onnxconet.search.driver import load_checkpoint

        path = self._checkpoint_path()
        if path is None or not self.resume:
            return None
        ckpt = load_checkpoint(path)
        if ckpt is None:
            return None
        meta = json.loads(ckpt.get("meta", "{}"))
        if (
            meta.get("options") != {str(k): v for k, v in self.options.items()}
            or meta.get("epochs") != self.epochs
            or meta.get("resolutions") != self._res_sizes()
        ):
            log.warning("%s was made with other options or epochs; starting the supernet over", path)
            return None
        return ckpt

    def _split(self, dataset) -> tuple[np.ndarray, np.ndarray]:
        n = len(dataset)
        perm = np.random.default_rng(self.seed).permutation(n)
        n_arch = min(n - 1, max(1, int(round(self.config.arch_split * n))))
        return np.sort(perm[n_arch:]), np.sort(perm[:n_arch])

    def _loader(self, dataset, idx: np.ndarray, batch_size: int, seed: int) -> DataLoader:
        return DataLoader(
            Subset(dataset, idx.tolist()),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=len(idx) > batch_size,
        )

    def train_supernet(self) -> None:
        """Phase 1 (resumable per epoch); then installs the bank the derived trials are cut from."""
        ev = self.evaluator
        if ev is None:
            raise OnnxconetError("DMaskingStrategy.attach(evaluator, out) must be called before ask()")
        if self.on == "latency" and self.predictor is None and not self.resolutions:
            # the run's calibrated predictor when it has one
            self.predictor = getattr(self.cost, "predictor", None) or self._latency_predictor()
        c, tcfg = self.config, ev.train_cfg
        device = resolve_device(ev.device)
        scores = ev.bank.scores(self.cg)  # the original's L1: the staircase order
        model = ev.bank.module().to(device).train()
        teacher = ev.teacher.to(device).eval()
        net = Supernet(model, self.cg, self.options, scores).to(device)
        if self.resolutions:  # one more logits vector: over the input resolutions
            net.logits["resolution"] = nn.Parameter(torch.zeros(len(self.resolutions), device=device))
        self.searched, self.skipped = list(net.gids), dict(net.skipped)
        if not net.gids:
            raise OnnxconetError(
                f"dmasking: no channel group can be masked in this model ({next(iter(self.skipped.values()), '')})"
            )
        wparams = [p for p in model.parameters() if p.requires_grad]
        wopt = torch.optim.SGD(wparams, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
        aopt = torch.optim.Adam(net.parameters(), lr=c.arch_lr, weight_decay=c.arch_wd)
        dataset = ev.train_loader.dataset
        batch_size = ev.train_loader.batch_size or 64
        w_idx, a_idx = self._split(dataset)
        steps_per_epoch = min(len(self._loader(dataset, w_idx, batch_size, 0)), tcfg.max_batches or 1 << 30)
        total_steps = max(1, steps_per_epoch * self.epochs)
        warm = int(round(c.warmup * self.epochs))
        start, seconds, step = 0, 0.0, 0
        ckpt = self._load_checkpoint()
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            net.load_state_dict(ckpt["logits"], strict=False)
            wopt.load_state_dict(ckpt["wopt"])
            aopt.load_state_dict(ckpt["aopt"])
            start, step = int(ckpt["epoch"]), int(ckpt["step"])
            self.logits_history = json.loads(ckpt["history"])
            seconds = float(ckpt.get("seconds", 0.0))
            self._emit(f"supernet restored after epoch {start}/{self.epochs}")
        else:
            self.logits_history = [self._snapshot(net, 0, c.tau0, None)]
        net.attach()
        try:
            for epoch in range(start, self.epochs):
                t0 = time.perf_counter()
                tau = c.tau0 * c.tau_decay**epoch
                frozen = epoch < warm
                gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                wl = self._loader(dataset, w_idx, batch_size, self.seed * 7919 + 2 * epoch)
                al = self._loader(dataset, a_idx, batch_size, self.seed * 7919 + 2 * epoch + 1)
                arch_iter = iter(al)
                sums = {"loss": 0.0, "arch": 0.0, "ratio": 0.0, "n": 0, "na": 0}
                for x, y in islice(wl, tcfg.max_batches):
                    x, y = x.to(device), y.to(device, dtype=torch.long)
                    lr = tcfg.lr * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
                    for group in wopt.param_groups:
                        group["lr"] = lr
                    xa = ya = None
                    if not frozen:
                        try:
                            xa, ya = next(arch_iter)
                        except StopIteration:
                            arch_iter = iter(al)
                            xa, ya = next(arch_iter)
                        xa, ya = xa.to(device), ya.to(device, dtype=torch.long)
                    loss, aloss, ratio = search_step(
                        self, net, model, teacher, wopt, aopt, (x, y), (xa, ya) if xa is not None else None,
                        tau, gen, tcfg.alpha, tcfg.temperature,
                    )  # fmt: skip
                    step += 1
                    sums["loss"] += float(loss)
                    sums["n"] += 1
                    if not math.isfinite(sums["loss"]):
                        raise OnnxconetError(
                            f"dmasking: supernet loss became NaN at epoch {epoch + 1}; lower --lr (now {tcfg.lr:g})"
                        )
                    if aloss is None:
                        continue
                    sums["arch"] += float(aloss)
                    sums["ratio"] += float(ratio)
                    sums["na"] += 1
                net.set_weights(None)
                seconds += time.perf_counter() - t0
                stats = {
                    "train_loss": sums["loss"] / max(sums["n"], 1),
                    "arch_loss": sums["arch"] / sums["na"] if sums["na"] else None,
                    "frozen": frozen,
                }
                tau_next = c.tau0 * c.tau_decay ** (epoch + 1)
                snap = self._snapshot(net, epoch + 1, tau_next, stats)
                self.logits_history.append(snap)
                self._emit(
                    f"supernet epoch {epoch + 1}/{self.epochs}: loss {stats['train_loss']:.3f}, τ {tau:.2f}, "
                    f"E[{self.on} ratio] {snap['expected_ratio']:.3f}, argmax {snap['argmax_ratio']:.3f}"
                    + (f", resolution {snap['argmax_resolution']}" if self.resolutions else "")
                    + (" (logits frozen)" if frozen else "")
                )
                path = self._checkpoint_path()
                if path is not None:
                    from onnxconet.search.driver import atomic_save

                    meta = {"options": {str(k): v for k, v in self.options.items()}, "epochs": self.epochs}
                    if self.resolutions:
                        meta["resolutions"] = self._res_sizes()
                    atomic_save(
                        {
                            "epoch": epoch + 1, "step": step, "seconds": seconds, "meta": json.dumps(meta),
                            "model": model.state_dict(), "logits": net.state_dict(),
                            "wopt": wopt.state_dict(), "aopt": aopt.state_dict(),
                            "history": json.dumps(self.logits_history),
                        },
                        path,
                    )  # fmt: skip
        finally:
            net.detach()
        self.logits = {gid: net.logits[str(gid)].detach().cpu().numpy().astype(float) for gid in net.gids}
        self.final_tau = c.tau0 * c.tau_decay**self.epochs
        if self.resolutions:
            self.res_logits = net.logits["resolution"].detach().cpu().numpy().astype(float)
            sizes = self._res_sizes()
            self.summary.update(
                {
                    "resolutions": sizes,
                    "resolution_scales": [round(r.scale, 4) for r in self.resolutions],
                    "resolution_logits": self.res_logits.tolist(),
                }
            )
            self.use_resolution(sizes[_argmax_last(self.res_logits)])
            self._emit(f"input resolution: {self.resolution.size} (of {sizes})")
        self.summary.update(
            {
                "epochs": self.epochs,
                "supernet_seconds": round(seconds, 1),
                "searched_groups": net.gids,
                "skipped_groups": {str(k): v for k, v in self.skipped.items()},
                "options": {str(k): v for k, v in net.options.items()},
                "sites": len(net.sites),
                "loss": c.loss,
                "final_logits": {str(k): v.tolist() for k, v in self.logits.items()},
            }
        )
        source = model if c.inherit == "supernet" else ev.teacher
        ev.bank = RankedBank(copy.deepcopy(source).cpu(), scores)
        self.trained = True

    def _res_sizes(self) -> list[int] | None:
        return [r.size for r in self.resolutions] if self.resolutions else None

    def _snapshot(self, net: Supernet, epoch: int, tau: float, stats: dict | None) -> dict:
        extra, res = {}, None
        with torch.no_grad():
            probs = net.probs(tau)
            rp = None
            if self.resolutions:
                rl = net.logits["resolution"].detach()
                rp = torch.softmax(rl / tau, dim=0)
                res = self.resolutions[_argmax_last(rl.cpu().numpy())]
                extra = {
                    "resolutions": self._res_sizes(),
                    "resolution_logits": [round(float(v), 5) for v in rl.cpu()],
                    "resolution_probs": [round(float(v), 5) for v in rp.cpu()],
                    "argmax_resolution": res.size,
                }
            ratio = float(self.expected_ratio(probs, net.options, rp))
        argmax = net.argmax_widths()
        return {
            "epoch": epoch,
            "tau": tau,
            "probs": {str(g): [round(float(v), 5) for v in p.cpu()] for g, p in probs.items()},
            "options": {str(g): list(o) for g, o in net.options.items()},
            "logits": {
                str(g): [round(float(v), 5) for v in net.logits[str(g)].detach().cpu()] for g in net.gids
            },
            "expected_ratio": ratio,
            "argmax": {str(g): w for g, w in argmax.items()},
            "argmax_ratio": self.predict_raw(argmax, res),
            **extra,
            **(stats or {}),
        }

    # ---- derivation
    def _snap(self, gid: int, w: float) -> int:
        grid = self.grid.get(gid)
        if not grid:
            return int(w)
        return int(grid[int(np.argmin([abs(v - w) for v in grid]))])

    def _probs(self, tau: float) -> dict[int, np.ndarray]:
        out = {}
        for gid, a in self.logits.items():
            z = a / tau
            e = np.exp(z - z.max())
            out[gid] = e / e.sum()
        return out

    def _raw(self, n: int) -> tuple[dict[int, float], str]:
        full = {g.id: float(g.hi) for g in self.space}
        if n == 0:
            raw = {
                gid: float(self.options[gid][int(len(a) - 1 - np.argmax(a[::-1]))])
                for gid, a in self.logits.items()
            }
            return full | raw, "argmax"
        tau = self.config.sample_tau or self.final_tau
        probs = self._probs(tau)
        if n == 1:
            raw = {gid: float(np.dot(p, self.options[gid])) for gid, p in probs.items()}
            return full | raw, "expected"
        raw = {gid: float(self.options[gid][self.rng.choice(len(p), p=p)]) for gid, p in probs.items()}
        return full | raw, "sample"

    def ask(self) -> dict[int, int]:
        if not self.trained:
            self.train_supernet()
        n = len(self.asked)
        raw, kind = self._raw(n)
        widths, scale = put_on_budget(raw, self.target(), self.predict, self._snap)
        tries = 0
        while widths in self.asked and tries < 20:  # a repeated configuration teaches nothing: draw again
            tries += 1
            raw, kind = self._raw(max(n, 2))
            widths, scale = put_on_budget(raw, self.target(), self.predict, self._snap)
        checked, factor = None, 1.0
        for _ in range(self.config.verify if self.on == "latency" else 0):
            checked = self._measure(widths)
            if checked is None or checked <= self.target():
                break
            # over the budget as measured: scale the prediction for this candidate and put it back on the budget
            factor = checked / max(self.predict(widths), 1e-6)
            widths, scale = put_on_budget(
                raw, self.target(), lambda w, f=factor: self.predict(w) * f, self._snap
            )
            checked = None
        self.asked.append(widths)
        snapped = {g: self._snap(g, w) for g, w in raw.items()}
        self._pending = {
            "derived": kind,
            "raw_widths": {str(g): int(w) for g, w in snapped.items()},
            "raw_ratio": self.predict(snapped),
            "scale": round(2.0**scale, 4),
            "predicted_ratio": self.predict(widths),
            "predicted_raw": self.predict_raw(widths),
            **({"check_factor": round(factor, 4)} if factor != 1.0 else {}),
        }
        return widths

    def _measure(self, widths: dict[int, int]) -> float | None:
        """Measured latency ratio of `widths` (cached in the run directory, so a replay asks the same widths)."""
        ev = self.evaluator
        judge = ev.judge if ev is not None else None
        if judge is None:
            return None
        key = json.dumps(sorted((int(g), int(w)) for g, w in widths.items()))
        path = self.out / CHECKS if self.out is not None else None
        if self._checks is None:
            self._checks = {}
            if path is not None and path.is_file() and self.resume:
                try:
                    self._checks = json.loads(path.read_text())
                except ValueError:
                    log.warning("%s is unreadable; measuring again", path)
        if key not in self._checks:
            from onnxconet.surgery.onnx import slice_onnx

            keep = self.cg.keep_mask(widths, ev.bank.scores(self.cg))
            self._checks[key] = float(judge.measure(slice_onnx(self.cg, keep))[0])
            if path is not None:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._checks))
                os.replace(tmp, path)
        return self._checks[key]

    def tell(self, trial: Trial) -> dict:
        pending = self._pending or {}
        self._pending = {}
        self.told += 1
        if (
            self.on == "latency"
            and trial.state is TrialState.COMPLETE
            and trial.latency_ratio
            and pending.get("predicted_raw")
        ):
            self.corrections.append(float(trial.latency_ratio) / pending["predicted_raw"])
        j = self.objective(trial)
        better = trial.state is TrialState.COMPLETE and j > self.best_objective
        if better:
            self.best_objective = j
        facts = {
            "accepted": bool(better),
            "objective": None if math.isinf(j) else j,
            **{k: v for k, v in pending.items() if k != "predicted_raw"},
        }
        if self.resolution is not None:
            facts["resolution"] = self.resolution.size
        if self.told == 1:
            facts["supernet"] = self.summary
            facts["logits_history"] = self.logits_history
        return facts
