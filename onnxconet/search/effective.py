"""FBNetV2's effective shapes: the expected FLOPs (MACs) or params of a model under independent per-group
width distributions, as a differentiable torch scalar.

dmasking's cost term for --budget-on flops | params (`search/dmasking/cost.py`), and every searched input
resolution's cost (`search/resolution.py`). Its own module because both use it: inside the dmasking package it
made resolution and dmasking import each other. Exact for the counting rules of `graph.stats` (the same
output-position rule, `output_positions`): a one-hot distribution gives `count_flops` / `count_params`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from onnxconet.errors import OnnxconetError
from onnxconet.graph.analysis import Analyzer
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import FLOAT_TYPES, output_positions


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
                positions = output_positions(g, node)
                if positions is not None:
                    terms.append(self._term(cg, pa[0], float(positions)))
        else:
            for name, t in g.initializers.items():
                if t.data_type in FLOAT_TYPES:
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
