"""Supernet masking for FBNetV2's DMaskingNAS, on any model the channel graph supports, without touching its code.

One supernet at full width. Every searched channel group g has width options c_1 < ... < c_K (channels) and one
set of architecture logits α_g (coupled layers share them: a residual group's producers all get the same mask).
With weights w = GumbelSoftmax(α_g; τ), channel j of the group is multiplied by the *staircase*

    M_j = Σ_{i : c_i > r(j)} w_i            r(j) = rank of j's bundle by importance (0 = most important)

i.e. Σ_i w_i·1_i with 1_i the indicator of the c_i most important channels. The ranking is fixed for the whole
search (per-bundle L1 of the original's producer weights, the order `ChannelGraph.keep_mask` cuts with), so a
derived width c keeps exactly the channels the staircase kept alive the longest. Ranks are in bundle units
(`group.divisor` channels per bundle): options are multiples of the divisor.

Where the mask acts ("sites"): where a channel's value is final for the group.
  * at the output of every normalization node (BatchNormalization, LayerNormalization, InstanceNormalization,
    GroupNormalization) whose channels belong to a searched group: a mask in front of a train-mode BN would be
    normalized away (BN(m·y) = BN(y)), and a norm after a residual Add (pre-activation nets) or after a
    depthwise conv (MobileNetV2) re-normalizes a mask applied upstream;
  * at a producer's output (Conv, Gemm, MatMul with a weight) unless every consumer of that output is a
    norm site (conv -> BN: the mask goes after the BN only).
Sites are found in the ONNX graph and mapped to torch modules by parameter names (initializer names are
state_dict keys); the mask is applied by a forward hook on that module. A probe forward checks that each
hooked module's output has exactly the shape of the ONNX tensor it stands for; a group whose producers cannot
all be covered by valid sites is not searched (it would leak unmasked channels through the uncovered path).

Memory: the group's staircase is one vector per group (a K x bundles matrix times w), gathered into one mask per
site and multiplied into the feature map once: one extra feature map per site whatever K is (FBNetV2's point).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onnxconet.graph.branches import branch_exits
from onnxconet.graph.groups import ChannelGraph, split_param_name
from onnxconet.space import WidthSpace

log = logging.getLogger(__name__)

NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --------------------------------------------------------------------------------------- width options
def width_grid(cg: ChannelGraph, space: WidthSpace, gid: int, align: int = 8) -> list[int]:
    """The allowed widths of group `gid`: the space's values, restricted to multiples of `align` (times the
    group's divisor) when the group is wide enough for at least 4 of them; the full width always included;
    0 first where the space lets the group's branch go (`WidthSpace(depth=True)`)."""
    gs = space.groups[gid]
    values = [w for w in gs.options() if w > 0]
    div = cg.groups[gid].divisor
    unit = math.lcm(max(1, align), div)
    if align > 1 and gs.hi >= 4 * unit:
        aligned = [w for w in values if w % unit == 0]
        if len(aligned) >= 2:
            values = aligned
    if values[-1] != gs.hi:
        values.append(gs.hi)
    return [0] * gs.zero + values


def width_options(
    cg: ChannelGraph, space: WidthSpace, max_options: int = 8, align: int = 8
) -> dict[int, list[int]]:
    """Per searched group, at most `max_options` widths spread evenly over its grid (`width_grid`), smallest
    and full width included, and 0 on top where the group's branch may go; ascending, in channels (multiples
    of the group's divisor)."""
    if max_options < 2:
        raise ValueError(f"max_options must be >= 2, got {max_options}")
    out: dict[int, list[int]] = {}
    for gs in space:
        grid = width_grid(cg, space, gs.id, align)
        zero, grid = grid[:1] if grid[0] == 0 else [], [w for w in grid if w > 0]
        if len(grid) > max_options:
            idx = np.unique(np.round(np.linspace(0, len(grid) - 1, max_options)).astype(int))
            grid = [grid[i] for i in idx]
        if len(zero + grid) >= 2:
            out[gs.id] = zero + grid
    return out


def staircase_matrix(options_bundles: Sequence[int], nbundles: int) -> np.ndarray:
    """T (nbundles x K): T[r, i] = 1 when option i keeps rank r (r < b_i). The staircase is T @ w."""
    b = np.asarray(options_bundles, dtype=np.int64)
    return (np.arange(nbundles)[:, None] < b[None, :]).astype(np.float32)


def importance_ranks(cg: ChannelGraph, scores: np.ndarray) -> np.ndarray:
    """Rank of every bundle inside its group: 0 = highest score (the order `keep_mask` keeps them in)."""
    rank = np.zeros(len(cg.group_of_bundle), dtype=np.int64)
    for g in cg.groups:
        order = np.argsort(-scores[g.bundles], kind="stable")
        rank[g.bundles[order]] = np.arange(len(order))
    return rank


# --------------------------------------------------------------------------------------- sites
@dataclass
class MaskSite:
    """One hooked module: its output's channel positions carry `ids` (channel ids) on axis `axis` (negative)."""

    module: str
    tensor: str  # the ONNX tensor the module's output stands for
    kind: str  # "norm" | "producer"
    axis: int
    ids: np.ndarray
    shape: tuple[int, ...]  # the ONNX tensor's shape (batch of the export)


def _module_of(node, cg: ChannelGraph) -> str | None:
    for name in node.inputs[1:]:
        if name in cg.graph.initializers:
            return split_param_name(name)[0]
    return node.scope or None


def _site_for(cg: ChannelGraph, node, tensor: str, kind: str, module: str | None) -> MaskSite | None:
    cmap = cg.maps.get(tensor)
    shape = cg.graph.shape(tensor)
    if module is None or cmap is None or not cmap.is_1d or shape is None or None in shape:
        return None
    axis = cmap.axes[0] - len(shape)
    return MaskSite(module, tensor, kind, axis, np.asarray(cmap.ids).ravel(), tuple(int(d) for d in shape))


def candidate_sites(cg: ChannelGraph, gids: Iterable[int]) -> tuple[list[MaskSite], dict[int, list[str]]]:
    """Norm and producer sites touching the groups `gids`, and per group the ONNX outputs of its producers
    (each must end up covered by a site). Producer sites whose outputs feed only norm sites are included
    with kind "producer-covered" so that the caller can drop them once the norm sites are validated."""
    gids = set(gids)
    group_of_id = cg.group_of_bundle[cg.bundle_of_id]
    g = cg.graph
    sites: list[MaskSite] = []
    norm_tensor_of_input: dict[str, str] = {}
    for node in g.nodes:
        if node.op not in NORM_OPS or not node.outputs or not node.outputs[0]:
            continue
        site = _site_for(cg, node, node.outputs[0], "norm", _module_of(node, cg))
        if site is not None and set(group_of_id[site.ids].tolist()) & gids:
            sites.append(site)
            norm_tensor_of_input[node.inputs[0]] = node.outputs[0]
    producer_outputs: dict[int, list[str]] = {gid: [] for gid in gids}
    seen: set[tuple[str, str]] = set()
    for m in cg.members.values():
        if m.role != "producer":
            continue
        touched = set(group_of_id[m.ids].tolist()) & gids
        if not touched:
            continue
        nodes = [g_node for g_node in g.nodes if g_node.name in set(m.nodes) and g_node.op in COMPUTE_OPS]
        module = split_param_name(m.param)[0]
        for node in nodes:
            out = node.outputs[0]
            for gid in touched:
                producer_outputs[gid].append(out)
            if (module, out) in seen:
                continue
            seen.add((module, out))
            site = _site_for(cg, node, out, "producer", module)
            if site is not None:
                sites.append(site)
    return sites, producer_outputs


def _covered(cg: ChannelGraph, tensor: str, valid: dict[str, MaskSite]) -> bool:
    """A producer output is covered by its own valid site, or when every consumer is a valid norm site."""
    site = valid.get(tensor)
    if site is not None and site.kind == "producer":
        return True
    consumers = cg.graph.consumers.get(tensor, [])
    return bool(consumers) and all(
        c.op in NORM_OPS and c.outputs and c.outputs[0] in valid and valid[c.outputs[0]].kind == "norm"
        for c in consumers
    )


def probe_shapes(model: nn.Module, modules: Iterable[str], input_shape: Sequence[int]) -> dict[str, set]:
    """Output shapes of the named modules in one eval-mode forward on a random input of `input_shape`."""
    shapes: dict[str, set] = {}
    handles = []
    for name in set(modules):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue

        def rec(_m, _i, out, name=name):
            shapes.setdefault(name, set()).add(tuple(out.shape) if isinstance(out, torch.Tensor) else None)

        handles.append(mod.register_forward_hook(rec))
    was_training = model.training
    try:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model.eval()
            model(torch.randn(*input_shape, device=dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def plan_sites(
    cg: ChannelGraph, model: nn.Module, gids: Iterable[int]
) -> tuple[list[MaskSite], list[int], dict[int, str]]:
    """The sites to hook for the groups `gids`: (sites, groups that can be searched, reasons for the others).

    A site is valid when its torch module exists and every call of it in a forward returns a tensor of exactly
    the ONNX tensor's shape. Producer sites whose output goes only to valid norm sites are dropped (the mask
    goes after the norm). A group is searchable when every producer output of the group is covered.
    """
    gids = sorted(set(gids))
    cands, producer_outputs = candidate_sites(cg, gids)
    input_shape = cg.graph.shape(cg.graph.inputs[0])
    shapes = probe_shapes(model, [s.module for s in cands], input_shape)
    valid: dict[str, MaskSite] = {}
    module_tensor: dict[str, str] = {}
    for s in cands:
        got = shapes.get(s.module)
        if got != {s.shape}:
            log.debug(
                "mask site %s (%s): module output %s != ONNX %s; skipped", s.module, s.tensor, got, s.shape
            )
            continue
        if module_tensor.get(s.module, s.tensor) != s.tensor:
            # one module standing for two different tensors (called twice on different channels): unusable
            log.debug("mask site %s stands for two tensors; skipped", s.module)
            valid.pop(module_tensor[s.module], None)
            continue
        module_tensor[s.module] = s.tensor
        valid[s.tensor] = s
    searchable, reasons = [], {}
    for gid in gids:
        missing = [t for t in producer_outputs[gid] if not _covered(cg, t, valid)]
        if missing:
            reasons[gid] = (
                f"no torch module whose output is ONNX tensor {missing[0]!r} (a producer of the group)"
            )
        else:
            searchable.append(gid)
    group_of_id = cg.group_of_bundle[cg.bundle_of_id]
    keep = set(searchable)
    sites = []
    for s in valid.values():
        if not set(group_of_id[s.ids].tolist()) & keep:
            continue
        if (
            s.kind == "producer"
            and all(
                c.op in NORM_OPS and c.outputs and c.outputs[0] in valid
                for c in cg.graph.consumers.get(s.tensor, [])
            )
            and cg.graph.consumers.get(s.tensor)
        ):
            continue  # the mask goes after the norm
        sites.append(s)
    return sites, searchable, reasons


@dataclass(frozen=True)
class GateSite:
    """A module whose output is the ONNX tensor `tensor`, through which group `gid`'s removable branch reaches
    its residual merge (`graph.branches.branch_exits`)."""

    module: str
    tensor: str
    gid: int


def plan_gates(
    cg: ChannelGraph, model: nn.Module, gids: Iterable[int]
) -> tuple[list[GateSite], dict[int, str]]:
    """The gates of the groups `gids` (those offered width 0): (gate sites, reasons for the groups that get
    none and so may not take 0). A group is gated when every exit of its branch is the output of a torch module
    that stands for that one ONNX tensor and returns its shape (as `plan_sites` checks a mask site)."""
    modules: dict[str, set[str]] = {}
    for node in cg.graph.nodes:
        mod = _module_of(node, cg)
        if mod and node.outputs:
            modules.setdefault(mod, set()).update(o for o in node.outputs if o)
    wanted: dict[int, list[tuple[str | None, str]]] = {}
    for gid in sorted(set(gids)):
        wanted[gid] = []
        for t in branch_exits(cg, gid):
            node = cg.graph.producer.get(t)
            wanted[gid].append((_module_of(node, cg) if node is not None else None, t))
    input_shape = cg.graph.shape(cg.graph.inputs[0])
    shapes = probe_shapes(model, [m for w in wanted.values() for m, _ in w if m], input_shape)
    gates, reasons = [], {}
    for gid, exits in wanted.items():
        why = None if exits else "its branch cannot be removed"
        for module, t in exits:
            shape = cg.graph.shape(t)
            if module is None or modules.get(module) != {t}:
                why = f"no torch module stands for ONNX tensor {t!r} alone (the branch's exit)"
            elif shape is None or shapes.get(module) != {tuple(int(d) for d in shape)}:
                why = f"module {module}'s output is not ONNX tensor {t!r}'s shape (the branch's exit)"
            if why:
                break
        if why:
            reasons[gid] = why
        else:
            gates.extend(GateSite(module, t, gid) for module, t in exits)
    return gates, reasons


def depth_options(
    cg: ChannelGraph, model: nn.Module, options: Mapping[int, Sequence[int]]
) -> tuple[dict[int, list[int]], dict[int, str]]:
    """`options` without width 0 where the group's branch cannot be gated (`plan_gates`), and why."""
    out = {gid: list(o) for gid, o in options.items()}
    _, reasons = plan_gates(cg, model, [gid for gid, o in out.items() if o and o[0] == 0])
    for gid in reasons:
        out[gid] = out[gid][1:]
    return {gid: o for gid, o in out.items() if len(o) >= 2}, reasons


def _one_hot_constants(weights: Mapping[int, torch.Tensor]) -> bool:
    """Every weight vector is a one-hot without a gradient: one real sub-network. (Called every supernet step
    when gates exist: one device-to-host read for all groups, not two per group.)"""
    ws = list(weights.values())
    if not ws or any(w.requires_grad for w in ws):
        return not ws
    flat = torch.cat([w.reshape(-1) for w in ws])
    sums = torch.stack([w.sum() for w in ws])
    return bool((((flat == 0) | (flat == 1)).all() & (sums == 1).all()).item())


# --------------------------------------------------------------------------------------- the supernet
class Supernet(nn.Module):
    """Architecture logits + staircase masks hooked into `model` (kept as an attribute, not a submodule).

    Usage:
        net = Supernet(model, cg, options, scores)        # options: {gid: [channels...]}
        net.attach()
        w = net.sample(tau)                               # {gid: Gumbel-softmax weights}, differentiable
        net.set_weights(w); loss = f(model(x)); ...       # every hooked output is masked with w
        net.detach()

    Attributes:
        gids: searched groups (the others of `options` could not be masked; see `skipped`).
        options: {gid: widths in channels} of the searched groups.
        logits: one parameter vector per searched group (key str(gid)).
        sites: the hooked modules.
        skipped: {gid: reason} for the groups of `options` that are not searched.
        gates: where a group offered width 0 (its residual branch removed, `--depth`) fades its branch out.

    Width 0 (option 0 of a group whose branch may go): its staircase column is all zeros. With one-hot weights
    (a real sub-network: the weights step) that zeroes the group's channels and the rest of the branch computes
    exactly what the removed branch leaves, its constant offset. Soft weights (the logits step) would barely
    feel option 0 that way: the uniform factor 1 - w_0 it puts on the group's channels is normalized away by
    the branch's next BatchNorm. So with soft or straight-through weights the branch's exits into the merge
    (`GateSite`) are also multiplied by 1 - w_0, and the task loss sees the branch fade; the relaxation's end
    point is the branch at 0, where the removed branch leaves its offset (the last BatchNorm's shift), which
    the derived candidate's BatchNorm re-estimation and fine-tuning see.
    """

    def __init__(
        self,
        model: nn.Module,
        cg: ChannelGraph,
        options: Mapping[int, Sequence[int]],
        scores: np.ndarray,
    ) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: its parameters are not the architecture's
        self.cg = cg
        sites, gids, self.skipped = plan_sites(cg, model, options)
        for gid, why in self.skipped.items():
            log.warning("dmasking: group %d is not searched: %s", gid, why)
        self.gids = gids
        self.options = {gid: [int(w) for w in options[gid]] for gid in gids}
        self.sites = sites
        self.gates, no_gate = plan_gates(cg, model, [g for g in gids if self.options[g][0] == 0])
        if no_gate:
            gid, why = next(iter(no_gate.items()))
            raise ValueError(f"group {gid} is offered width 0 but {why}; drop it (masks.depth_options)")
        self.logits = nn.ParameterDict(
            {str(gid): nn.Parameter(torch.zeros(len(self.options[gid]))) for gid in gids}
        )
        rank = importance_ranks(cg, scores)
        self.rank_of_bundle = rank
        offsets, T = {}, []
        pos = 1  # index 0 of the mask vector is the constant 1 (channels of groups not searched)
        for gid in gids:
            grp = cg.groups[gid]
            nb = len(grp.bundles)
            bundles = [w // grp.divisor for w in self.options[gid]]
            offsets[gid] = pos
            T.append(torch.from_numpy(staircase_matrix(bundles, nb)))
            pos += nb
        self._offsets = offsets
        for i, t in enumerate(T):
            self.register_buffer(f"_T{i}", t, persistent=False)
        self._index: dict[str, torch.Tensor] = {}
        for s in sites:
            bundles = cg.bundle_of_id[s.ids]
            groups = cg.group_of_bundle[bundles]
            idx = np.zeros(len(s.ids), dtype=np.int64)
            for gid, off in offsets.items():
                sel = groups == gid
                idx[sel] = off + rank[bundles[sel]]
            self._index[s.module] = torch.from_numpy(idx)
        self._vec: torch.Tensor | None = None
        self._gate: dict[str, torch.Tensor] = {}  # module -> the factor its output is faded by
        self._handles: list = []

    # ---- distributions
    def probs(self, tau: float = 1.0) -> dict[int, torch.Tensor]:
        """softmax(α / τ) per group (differentiable): the sampling distribution without noise."""
        return {gid: torch.softmax(self.logits[str(gid)] / tau, dim=0) for gid in self.gids}

    def sample(
        self, tau: float, generator: torch.Generator | None = None, hard: bool = False
    ) -> dict[int, torch.Tensor]:
        """Gumbel-softmax weights per group: softmax((α + G) / τ), G ~ Gumbel(0, 1) (differentiable in α).
        `hard`: the one-hot of the sampled option in the forward, the soft weights' gradient in the backward
        (straight-through): the network sees one real sub-network per step."""
        out = {}
        for gid in self.gids:
            a = self.logits[str(gid)]
            u = torch.rand(a.shape, generator=generator, dtype=a.dtype).to(a.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
            soft = torch.softmax((a + gumbel) / tau, dim=0)
            if hard:
                one = torch.zeros_like(soft)
                one[int(soft.detach().argmax())] = 1.0
                soft = one - soft.detach() + soft
            out[gid] = soft
        return out

    def one_hot(self, widths: Mapping[int, int]) -> dict[int, torch.Tensor]:
        """Weights that select exactly `widths` (each must be one of the group's options)."""
        out = {}
        for gid in self.gids:
            w = torch.zeros(len(self.options[gid]), device=self.logits[str(gid)].device)
            w[self.options[gid].index(int(widths.get(gid, self.options[gid][-1])))] = 1.0
            out[gid] = w
        return out

    # ---- masks
    def staircases(self, weights: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Per group, the mask of each bundle *by rank* (rank 0 first): Σ_{i: b_i > r} w_i."""
        return {gid: getattr(self, f"_T{i}") @ weights[gid] for i, gid in enumerate(self.gids)}

    def set_weights(self, weights: Mapping[int, torch.Tensor] | None) -> None:
        """Masks for the next forwards (None: no masking, the plain full-width model)."""
        self._gate = {}
        if weights is None:
            self._vec = None
            return
        if self.gates and not _one_hot_constants(weights):
            for gate in self.gates:
                fade = 1.0 - weights[gate.gid][0]
                prev = self._gate.get(gate.module)
                self._gate[gate.module] = fade if prev is None else prev * fade
        stairs = self.staircases(weights)
        ref = next(iter(stairs.values()), None)
        one = torch.ones(
            1, device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None
        )
        self._vec = torch.cat([one, *[stairs[gid] for gid in self.gids]])

    def channel_masks(self, weights: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mask of every site's channel positions (for tests and inspection)."""
        self.set_weights(weights)
        try:
            return {s.module: self._vec[self._index[s.module].to(self._vec.device)] for s in self.sites}
        finally:
            self._vec, self._gate = None, {}

    def _mask(self, site: MaskSite, out: torch.Tensor) -> torch.Tensor:
        index = self._index[site.module]
        if index.device != out.device:
            index = self._index[site.module] = index.to(out.device)
        vec = self._vec.to(dtype=out.dtype) if self._vec.dtype != out.dtype else self._vec
        shape = [1] * out.dim()
        shape[site.axis] = -1
        return out * vec[index].view(shape)

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for s in self.sites:
            mod = self.model.get_submodule(s.module)

            def hook(_m, _i, out, site=s):
                if self._vec is None or not isinstance(out, torch.Tensor):
                    return out
                return self._mask(site, out)

            self._handles.append(mod.register_forward_hook(hook))
        for name in sorted({g.module for g in self.gates}):

            def gate(_m, _i, out, name=name):
                fade = self._gate.get(name)
                if fade is None or not isinstance(out, torch.Tensor):
                    return out
                return out * fade.to(dtype=out.dtype, device=out.device)

            self._handles.append(self.model.get_submodule(name).register_forward_hook(gate))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._vec = None
        self._gate = {}

    # ---- derivation
    def argmax_widths(self) -> dict[int, int]:
        """The most likely option per group (ties go to the wider option)."""
        out = {}
        for gid in self.gids:
            a = self.logits[str(gid)].detach().cpu().numpy()
            out[gid] = self.options[gid][int(len(a) - 1 - np.argmax(a[::-1]))]
        return out

    def expected_widths(self, tau: float = 1.0) -> dict[int, float]:
        return {
            gid: float((p.detach().cpu() * torch.tensor(self.options[gid], dtype=p.dtype)).sum())
            for gid, p in self.probs(tau).items()
        }
