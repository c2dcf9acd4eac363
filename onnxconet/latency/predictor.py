"""Latency predictor: a candidate's latency from its widths, without running it.

Model. Every Conv / ConvTranspose / Gemm / MatMul with a weight initializer is a *layer*; every other op
that moves channel data (BatchNormalization, Relu, Add, Mul, pooling, ReduceMean, Concat, ...) is *memory*
work. Pruning never changes spatial sizes, so each quantity below is read once from the exported graph
at full width and then depends on the widths only through the channel extents of the layer's axes:

    d(ρ) = c + Σ_g n_g ρ_g            (an axis: c fixed slots + n_g slots of group g; ρ_g = w_g / C_g)
    macs_l   = P_l K_l d0_l(ρ) d1_l(ρ)  (P = output positions, K = kernel size, d0/d1 = weight axes 0/1)
    weight_l = K_l d0_l(ρ) d1_l(ρ)
    act_l    = elements of the layer's input + output tensors  (linear in ρ)
    ew       = elements written by per-channel ops onnxruntime fuses into a conv when it can
               (BatchNormalization, Relu, Clip, ...)                 (linear in ρ)
    mem      = elements written by the other memory ops                (linear in ρ)

The features are these quantities summed over a layer *class* (dense k×k conv, 1×1 conv, grouped or
depthwise conv, fully connected), each normalized to 1 at full width. The predicted latency, relative to
the full-width reference, is

    ratio(ρ) = θ_0 + Σ_f θ_f F_f(ρ),   θ ≥ 0,

fitted by non-negative least squares on relative errors to whole-network measurements (candidate vs
reference, timed the in-loop way: see `onnxconet.latency.candidate`). Milliseconds are the ratio times the
reference's median. Because every n_g, c and θ is non-negative, the prediction is **monotone
non-decreasing in each group's width** by construction, and it is a quadratic form in ρ: after the fit
it collapses to ``t0 + l·ρ + ρᵀQρ`` (microseconds per prediction; JSON-serializable).

A residual branch removed whole (a group at width 0, `graph.branches`) takes its nodes with it: their launches
and also the data its first conv read and its last conv and BatchNorm wrote on the residual stream, which do not
depend on the removed group's width. Each feature carries that as Σ_g [ρ_g = 0] (z_g + Z_g·ρ) (`_Quad`), so a
feature at widths with branches removed equals the same feature read from the pruned file.

Differentiable path (`expected_latency`, for FBNetV2-style channel masking): with independent per-group
width distributions p_g over options c_{g,i}, the expectation of the quadratic form is exact from the first
two moments per group, m_g = Σ_i p_{g,i} ρ_{g,i} and s_g = Σ_i p_{g,i} ρ_{g,i}²:

    E[ratio] = t0 + l·m + Σ_{g≠h} Q_gh m_g m_h + Σ_g Q_gg s_g.

For a layer whose input group a and output group b differ, this equals Σ_ij p_{a,i} p_{b,j} LUT_l(c_i, c_j)
with LUT_l the fitted model's cost of that layer at (c_i, c_j): the bilinear LUT expectation, not the
cheaper "latency at the expected width" (which underestimates when a group's input and output are the same).

CPU note (measured, onnxruntime 1.31, AVX-512, tools/bench_latency.py): the model assumes latency grows
with every width. That holds for the graph as exported today, where a conv's bias is computed at run time
(Expand of a CastLike) so onnxruntime fuses nothing (BatchNormalization, Clip and the NCHWc layout all stay
off): there 63 vs 64 channels per group differ by the FLOPs. It does not hold once the graph is deployable
(CastLike folded: BN/activation fused, NCHWc convolutions): MLAS then runs a conv in the blocked NCHWc layout
only when its channel counts are multiples of 16 (8 on AVX2) and falls back to a slower path otherwise, so
random unaligned widths of mobilenet_v2 / efficientnet_b0 measured *slower* than the full model. Search
widths in multiples of the block there (`WidthSpace(align=16)`); groups too narrow to align stay a source of
error the predictor cannot represent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls
from scipy.stats import spearmanr

from onnxconet.errors import LatencyError
from onnxconet.files import atomic_write
from onnxconet.graph.analysis import Analyzer
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import output_positions
from onnxconet.latency.profile import PAIRED

log = logging.getLogger(__name__)

FORMAT = "onnxconet-latency-predictor/1"
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops that move no data (views, shape arithmetic)
_NO_COST = {
    "Shape", "Constant", "ConstantOfShape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast",
    "CastLike", "Expand", "Dropout", "Gather", "SequenceAt", "SplitToSequence",
}  # fmt: skip
# per-channel ops that onnxruntime fuses into the preceding conv when it can (constant conv bias, constant clip
# bounds); they stay a separate feature, so a graph where fusion is blocked is modelled too
_FUSABLE = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Silu"}
LAYER_CLASSES = ("conv", "pw", "dw", "fc")
FEATURES = ("macs", "act", "weight")


# --------------------------------------------------------------------------------------- quadratic forms
@dataclass
class _Affine:
    """c + n·ρ over the groups of a `_Space` (an axis extent or a tensor's channel count)."""

    c: float
    n: np.ndarray

    def scaled(self, s: float) -> _Affine:
        return _Affine(self.c * s, self.n * s)


@dataclass
class _Quad:
    """c + l·ρ + ρᵀQρ + Σ_g [ρ_g = 0] (z_g + Z_g·ρ) (Q, Z dense, G×G). The last term is what a group at width 0
    removes beyond its channels: the nodes of its residual branch (`graph.branches`) go whole, with their
    launches (z) and the data they read and write on the stream the branch leaves (Z: linear in the other
    groups' widths; a removed layer's products all hold the removed group, so they vanish by themselves)."""

    c: float
    l: np.ndarray  # noqa: E741 - the usual name of a linear term
    Q: np.ndarray
    z: np.ndarray | None = None
    Z: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.z is None:
            self.z = np.zeros(len(self.l))
        if self.Z is None:
            self.Z = np.zeros_like(self.Q)

    @classmethod
    def zero(cls, g: int) -> _Quad:
        return cls(0.0, np.zeros(g), np.zeros((g, g)))

    def add_affine(self, a: _Affine, s: float = 1.0) -> None:
        self.c += s * a.c
        self.l += s * a.n

    def add_product(self, a: _Affine, b: _Affine, s: float = 1.0) -> None:
        self.c += s * a.c * b.c
        self.l += s * (a.c * b.n + b.c * a.n)
        ia, ib = np.nonzero(a.n)[0], np.nonzero(b.n)[0]  # a layer touches few groups: stay O(touched²)
        if len(ia) and len(ib):
            self.Q[np.ix_(ia, ib)] += s * np.outer(a.n[ia], b.n[ib])

    def remove_with(self, col: int, q: _Quad) -> None:
        """`q` (one node's share, already added) is gone when group `col` is at width 0."""
        self.z[col] -= q.c
        self.Z[col] -= q.l

    def at_full(self) -> float:
        return float(self.c + self.l.sum() + self.Q.sum())

    def scaled(self, s: float) -> _Quad:
        return _Quad(self.c * s, self.l * s, self.Q * s, self.z * s, self.Z * s)

    def add(self, q: _Quad, s: float = 1.0) -> None:
        self.c += s * q.c
        self.l += s * q.l
        self.Q += s * q.Q
        self.z += s * q.z
        self.Z += s * q.Z

    def __call__(self, R: np.ndarray) -> np.ndarray:
        """Values at the rows of R (N×G relative widths)."""
        zero = (R == 0).astype(R.dtype)
        quad = np.einsum("ng,gh,nh->n", R, self.Q, R)
        return self.c + R @ self.l + quad + zero @ self.z + np.einsum("ng,gh,nh->n", zero, self.Z, R)

    def to_json(self) -> dict:
        i, j = np.nonzero(self.Q)
        d = {"c": self.c, "l": self.l.tolist(), "Q": [i.tolist(), j.tolist(), self.Q[i, j].tolist()]}
        zi, zj = np.nonzero(self.Z)
        return (
            d
            | ({"z": self.z.tolist()} if self.z.any() else {})
            | ({"Z": [zi.tolist(), zj.tolist(), self.Z[zi, zj].tolist()]} if len(zi) else {})
        )

    @classmethod
    def from_json(cls, d: Mapping, g: int) -> _Quad:
        def dense(key: str) -> np.ndarray:
            M = np.zeros((g, g))
            if key in d:
                i, j, v = d[key]
                M[np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)] = v
            return M

        z = np.asarray(d["z"], dtype=np.float64) if "z" in d else None
        return cls(float(d["c"]), np.asarray(d["l"], dtype=np.float64), dense("Q"), z, dense("Z"))


# --------------------------------------------------------------------------------------- features
@dataclass
class LayerInfo:
    """One compute layer as the predictor sees it (for reports and tests)."""

    node: str
    op: str
    cls: str
    macs: float  # at full width
    groups: tuple[int, ...]  # prunable groups its weight axes depend on


class LatencyFeatures:
    """The feature quadratic forms of a channel graph (see the module docstring).

    Attributes:
        gids: prunable group ids, in feature-vector order.
        channels: their full widths.
        names: feature names ("conv.macs", ..., "mem").
        quads: one quadratic form per feature, normalized to 1 at full width.
        layers: the compute layers found.
    """

    def __init__(self, cg: ChannelGraph) -> None:
        t0 = time.perf_counter()
        self.fingerprint = cg.fingerprint()
        self.gids = [g.id for g in cg.prunable]
        self.channels = np.array([g.channels for g in cg.prunable], dtype=np.float64)
        self._col = {gid: i for i, gid in enumerate(self.gids)}
        self._group_of_id = cg.group_of_bundle[cg.bundle_of_id]
        self._cg = cg
        self._analyzer = Analyzer(cg.graph)
        G = len(self.gids)
        raw: dict[str, _Quad] = {f"{c}.{f}": _Quad.zero(G) for c in LAYER_CLASSES for f in FEATURES}
        raw["ew"] = _Quad.zero(G)
        raw["mem"] = _Quad.zero(G)
        self.layers: list[LayerInfo] = []
        g = cg.graph
        # the nodes that go with a removed branch (graph.branches), by the column of the group whose width 0
        # removes them (a node in two branches is charged to the first)
        removed_with: dict[str, int] = {}
        for gid, names in cg.removable.items():
            for name in names if gid in self._col else ():
                removed_with.setdefault(name, self._col[gid])
        for node in g.nodes:
            col = removed_with.get(node.name)
            into = raw if col is None else {}  # a removable node's share, added and gated below
            if node.op in COMPUTE_OPS:
                self._add_layer(node, into)
            elif node.op not in _NO_COST and node.outputs and node.outputs[0]:
                a = self._activation(node.outputs[0])
                if a is not None:
                    into.setdefault("ew" if node.op in _FUSABLE else "mem", _Quad.zero(G)).add_affine(a)
            if col is not None:
                for name, q in into.items():
                    raw[name].add(q)
                    raw[name].remove_with(col, q)
        # nodes: every costed node's fixed share (its launch), gone with a removed branch
        costed = {n.name for n in g.nodes if n.op not in _NO_COST}
        nodes = _Quad(float(len(costed)), np.zeros(G), np.zeros((G, G)))
        for name in costed.intersection(removed_with):
            nodes.z[removed_with[name]] -= 1.0
        if nodes.z.any():
            raw["nodes"] = nodes
        self.names: list[str] = []
        self.quads: list[_Quad] = []
        self.scale: list[float] = []  # each feature's value at full width (MACs, elements)
        for name, q in raw.items():
            full = q.at_full()
            if full > 0:
                self.names.append(name)
                self.quads.append(q.scaled(1 / full))
                self.scale.append(full)
        self._cg = self._analyzer = None  # not kept: features must stay serializable and light
        self.build_seconds = time.perf_counter() - t0

    # ---- graph reading
    def _ids_affine(self, ids: np.ndarray) -> _Affine:
        n = np.zeros(len(self.gids))
        fixed = 0.0
        groups, counts = np.unique(self._group_of_id[np.asarray(ids).ravel()], return_counts=True)
        for gid, cnt in zip(groups.tolist(), counts.tolist(), strict=True):
            col = self._col.get(gid)
            if col is None:
                fixed += cnt
            else:
                n[col] += cnt
        return _Affine(fixed, n)

    def _axis(self, param: str, axis: int, dim: int) -> _Affine:
        m = self._cg.members.get((param, axis))
        if m is None:
            return _Affine(float(dim), np.zeros(len(self.gids)))
        a = self._ids_affine(m.ids)
        extra = dim - int(np.asarray(m.ids).size)  # positions the member does not cover stay
        return _Affine(a.c + max(extra, 0), a.n)

    def _activation(self, name: str) -> _Affine | None:
        """Elements of tensor `name` as an affine form (None when it carries no channels or has no shape)."""
        cmap = self._cg.maps.get(name)
        shape = self._cg.graph.shape(name)
        if cmap is None or shape is None or None in shape:
            return None
        total = float(np.prod(shape))
        per = total / max(int(cmap.ids.size), 1)
        return self._ids_affine(cmap.ids).scaled(per)

    def _tensor_elems(self, name: str) -> _Affine | None:
        a = self._activation(name)
        if a is not None:
            return a
        shape = self._cg.graph.shape(name)
        if shape is None or None in shape:
            return None
        return _Affine(float(np.prod(shape)), np.zeros(len(self.gids)))

    def _add_layer(self, node, raw: dict[str, _Quad]) -> None:
        g = self._cg.graph
        if len(node.inputs) < 2:
            return
        pa = self._analyzer.param_axis(
            node.inputs[1], 0
        )  # the weight, through casts/transposes (as count_flops)
        if pa is None:
            return
        wname = pa[0]
        wshape = g.shape(wname)
        if not wshape or len(wshape) < 2:
            return
        d0 = self._axis(wname, 0, wshape[0])
        d1 = self._axis(wname, 1, wshape[1])
        K = float(np.prod(wshape[2:])) if len(wshape) > 2 else 1.0
        positions = output_positions(g, node)
        if node.op == "Conv":
            cls = "dw" if int(node.attr("group", 1)) > 1 else ("pw" if K == 1 else "conv")
        else:
            cls = "conv" if node.op == "ConvTranspose" else "fc"
        if positions is None:
            log.debug("latency features: %s has no static shape; skipped", node.describe())
            return
        G = len(self.gids)
        raw.setdefault(f"{cls}.macs", _Quad.zero(G)).add_product(d0, d1, positions * K)
        raw.setdefault(f"{cls}.weight", _Quad.zero(G)).add_product(d0, d1, K)
        for name in (node.inputs[0], node.outputs[0]):
            a = self._tensor_elems(name)
            if a is not None:
                raw.setdefault(f"{cls}.act", _Quad.zero(G)).add_affine(a)
        touched = tuple(sorted({self.gids[i] for i in np.nonzero(d0.n + d1.n)[0].tolist()}))
        macs = positions * K * (d0.c + d0.n.sum()) * (d1.c + d1.n.sum())
        self.layers.append(LayerInfo(node.name, node.op, cls, macs, touched))

    # ---- evaluation
    def rel(self, widths_list: Sequence[Mapping[int, int]]) -> np.ndarray:
        """Relative widths ρ (N×G): a group missing from a widths dict is at full width."""
        R = np.ones((len(widths_list), len(self.gids)))
        for r, widths in enumerate(widths_list):
            for gid, w in widths.items():
                col = self._col.get(int(gid))
                if col is not None:
                    R[r, col] = float(w) / self.channels[col]
        return R

    def matrix(self, widths_list: Sequence[Mapping[int, int]]) -> np.ndarray:
        """Feature matrix (N×F), each feature 1 at full width."""
        R = self.rel(widths_list)
        return np.stack([q(R) for q in self.quads], axis=1) if self.quads else np.zeros((len(R), 0))

    def macs(self, widths_list: Sequence[Mapping[int, int]]) -> np.ndarray:
        """Multiply-accumulates of the compute layers at each widths config (as `count_flops` counts them;
        exact when every member of a group holds each of its channels equally often)."""
        X = self.matrix(widths_list)
        cols = [i for i, n in enumerate(self.names) if n.endswith(".macs")]
        return X[:, cols] @ np.asarray(self.scale)[cols]


# --------------------------------------------------------------------------------------- the predictor
@dataclass
class FitReport:
    """How a predictor was fitted and how good it looked on its own measurements."""

    measurements: int  # whole-network measurements used (the free full-width point excluded)
    loo_median_abs_err: float  # leave-one-out median |pred - measured| / measured
    loo_max_abs_err: float
    train_spearman: float
    seconds: float = 0.0
    remeasured: int = 0  # probes measured twice more because they sat far off the first fit (`outliers`)
    # non-zero coefficients, each the share of the reference's latency its feature explains at full width
    terms: dict[str, float] = field(default_factory=dict)


def _nnls_rel(X: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """min Σ ((Xθ - y)/y)² + ridge Σ θ_f²  subject to θ >= 0 (intercept = column 0, not penalized)."""
    A = X / y[:, None]
    b = np.ones_like(y)
    if ridge > 0 and X.shape[1] > 1:
        pen = np.sqrt(ridge) * np.eye(X.shape[1])[1:]
        A = np.vstack([A, pen])
        b = np.concatenate([b, np.zeros(len(pen))])
    theta, _ = nnls(A, b, maxiter=50 * X.shape[1] + 100)
    return theta


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


class LatencyPredictor:
    """Predicts a candidate's latency (ratio to the full-width reference, and milliseconds) from its widths.

    Build with `LatencyPredictor.fit(features, widths_list, ratios, reference_ms)` or, measuring the
    probes itself, `calibrate(...)`; save with `save` / `to_json`, reload with `load` / `from_json`.

    Attributes:
        reference_ms: median latency of the full-width model on the target (ms).
        target: the target it was measured on (JSON dict: provider, threads, batch, input shape, onnxruntime).
        report: the fit report (measurements used, leave-one-out error).
    """

    def __init__(
        self,
        features: LatencyFeatures,
        theta: np.ndarray,
        reference_ms: float,
        report: FitReport,
        target: dict | None = None,
    ) -> None:
        self.features = features
        self.theta = np.asarray(theta, dtype=np.float64)
        self.reference_ms = float(reference_ms)
        self.report = report
        self.target = dict(target or {})
        G = len(features.gids)
        total = _Quad(float(self.theta[0]), np.zeros(G), np.zeros((G, G)))
        for th, q in zip(self.theta[1:], features.quads, strict=True):
            if th > 0:
                total.add(q, th)
        self._total = total
        self._torch_cache: dict = {}
        # the measurements it was fitted on ((widths, ratio) pairs; the free full-width point excluded), for `refit`
        self.data: list[tuple[dict[int, int], float]] = []

    # ---- fitting
    @classmethod
    def fit(
        cls,
        features: LatencyFeatures,
        widths_list: Sequence[Mapping[int, int]],
        ratios: Sequence[float],
        reference_ms: float,
        *,
        target: dict | None = None,
        ridge: float = 1e-3,
        include_full: bool = True,
        loo: bool = True,
    ) -> LatencyPredictor:
        """Fit on measured ratios (candidate / reference latency, measured in-loop).

        Args:
            features: `LatencyFeatures(cg)` of the model.
            widths_list: the measured configurations ({group id: channels}; missing groups at full width).
            ratios: their measured latency ratios to the full-width reference.
            reference_ms: the reference's median latency (ms), to report milliseconds.
            target: the measurement target as a JSON dict (stored for the record).
            ridge: small L2 penalty on the feature weights (keeps the fit stable with few measurements).
            include_full: add the full-width point (ratio exactly 1, not a measurement).
            loo: compute (and log) the leave-one-out error; `refit` skips it.

        Returns:
            The predictor; `report.measurements` says how many measurements it used.
        """
        t0 = time.perf_counter()
        y = np.asarray(ratios, dtype=np.float64)
        if len(y) != len(widths_list) or len(y) == 0:
            raise LatencyError(f"fit needs one ratio per widths config (got {len(y)} and {len(widths_list)})")
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise LatencyError("fit: measured ratios must be positive and finite")
        X = features.matrix(widths_list)
        n_meas = len(y)
        if include_full:
            X = np.vstack([X, np.ones((1, X.shape[1]))])
            y = np.concatenate([y, [1.0]])
        X1 = np.hstack([np.ones((len(y), 1)), X])
        theta = _nnls_rel(X1, y, ridge)
        # leave-one-out over the measured points (the free full-width point always stays in)
        errs = []
        if loo and n_meas >= 3:
            for i in range(n_meas):
                keep = np.arange(len(y)) != i
                th = _nnls_rel(X1[keep], y[keep], ridge)
                errs.append(abs(float(X1[i] @ th) - y[i]) / y[i])
        pred = X1 @ theta
        terms = {"intercept": float(theta[0])} | {
            n: float(t) for n, t in zip(features.names, theta[1:], strict=True) if t > 0
        }
        report = FitReport(
            measurements=n_meas,
            loo_median_abs_err=float(np.median(errs)) if errs else float("nan"),
            loo_max_abs_err=float(np.max(errs)) if errs else float("nan"),
            train_spearman=_spearman(pred[:n_meas], y[:n_meas]),
            seconds=time.perf_counter() - t0,
            terms=terms,
        )
        if loo:
            log.info(
                "latency predictor: %d measurements, leave-one-out median error %.1f%%",
                n_meas,
                100 * report.loo_median_abs_err,
            )
        pred = cls(features, theta, reference_ms, report, target)
        pred.data = [
            ({int(g): int(w) for g, w in ws.items()}, float(r))
            for ws, r in zip(widths_list, ratios, strict=True)
        ]
        return pred

    def refit(self, measured: Sequence[tuple[Mapping[int, int], float]]) -> LatencyPredictor:
        """This predictor fitted again on its own measurements plus `measured` ((widths, ratio) pairs, e.g. the
        candidates a search measured): the per-layer costs move where the new measurements disagree, instead of
        one factor for every layer. Without stored measurements (a file from before they were kept) it is
        returned unchanged."""
        if not self.data or not measured:
            return self
        pairs = [*self.data, *measured]
        return LatencyPredictor.fit(
            self.features, [w for w, _ in pairs], [r for _, r in pairs], self.reference_ms, target=self.target,
            loo=False,
        )  # fmt: skip

    # ---- prediction
    def predict_ratio(self, widths: Mapping[int, int] | Sequence[Mapping[int, int]]) -> float | np.ndarray:
        """Latency relative to the full-width reference; one widths dict -> float, a list -> array."""
        single = isinstance(widths, Mapping)
        R = self.features.rel([widths] if single else list(widths))
        out = self._total(R)
        return float(out[0]) if single else out

    def predict_ms(self, widths: Mapping[int, int] | Sequence[Mapping[int, int]]) -> float | np.ndarray:
        """Predicted latency in milliseconds (ratio times the reference's median)."""
        r = self.predict_ratio(widths)
        return r * self.reference_ms

    def evaluate(self, widths_list: Sequence[Mapping[int, int]], measured_ratios: Sequence[float]) -> dict:
        """Spearman rank correlation and relative errors of the predictions against measured ratios."""
        pred = np.asarray(self.predict_ratio(list(widths_list)))
        y = np.asarray(measured_ratios, dtype=np.float64)
        err = np.abs(pred - y) / y
        return {
            "n": len(y),
            "spearman": _spearman(pred, y),
            "median_abs_err": float(np.median(err)),
            "p90_abs_err": float(np.percentile(err, 90)),
            "max_abs_err": float(err.max()),
        }

    # ---- differentiable expectation (FBNetV2-style masking)
    def expected_latency(
        self,
        probs: Mapping[int, Any],
        options: Mapping[int, Sequence[int]],
        *,
        widths: Mapping[int, int] | None = None,
        unit: str = "ms",
    ):
        """Expected latency under independent per-group width distributions, as a differentiable torch scalar.

        Args:
            probs: group id -> tensor of probabilities over that group's `options` (e.g. Gumbel-softmax
                weights; they need not sum to 1 exactly). Gradients flow to these tensors.
            options: group id -> candidate widths (channels) the probabilities refer to.
            widths: fixed widths of the groups not in `probs` (default: full width).
            unit: "ms" or "ratio" (relative to the full-width reference).

        Returns:
            A 0-d torch tensor: exact E[latency] of the fitted model (see the module docstring: first and
            second moments of each group's relative width; equals Σ_ij p_in,i p_out,j LUT(c_i, c_j) per layer).
        """
        import torch

        if unit not in ("ms", "ratio"):
            raise LatencyError(f"unit must be 'ms' or 'ratio', not {unit!r}")
        f = self.features
        ref = next((p for p in probs.values() if isinstance(p, torch.Tensor)), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        key = (dtype, device)
        if key not in self._torch_cache:
            Q = torch.as_tensor(self._total.Q, dtype=dtype, device=device)
            diag = torch.diagonal(Q).clone()
            Z = torch.as_tensor(self._total.Z, dtype=dtype, device=device)
            self._torch_cache[key] = (
                torch.as_tensor(self._total.l, dtype=dtype, device=device),
                Q - torch.diag(diag),
                diag,
                Z - torch.diag(torch.diagonal(Z)),  # [ρ_g = 0] ρ_g is 0
            )
        lin, Q_off, Q_diag, Z_off = self._torch_cache[key]
        base = f.rel([widths or {}])[0]
        m_parts, s_parts, z_parts = [], [], []
        idx = []
        for gid, p in probs.items():
            col = f._col.get(int(gid))
            if col is None:
                raise LatencyError(f"group {gid} is not a prunable group of this predictor's model")
            opts = torch.as_tensor(
                [float(c) / f.channels[col] for c in options[gid]], dtype=dtype, device=device
            )
            p = torch.as_tensor(p, dtype=dtype, device=device)
            if p.shape != opts.shape:
                raise LatencyError(
                    f"group {gid}: {tuple(p.shape)} probabilities for {len(options[gid])} width options"
                )
            m_parts.append((p * opts).sum())
            s_parts.append((p * opts * opts).sum())
            z_parts.append((p * (opts == 0)).sum())
            idx.append(col)
        m = torch.as_tensor(base, dtype=dtype, device=device)
        s = m * m
        z = (m == 0).to(dtype)  # P(width 0): a removed branch's nodes (`_Quad.z`, `_Quad.Z`)
        if idx:
            index = torch.as_tensor(idx, dtype=torch.long, device=device)
            m = m.index_put((index,), torch.stack(m_parts))
            s = s.index_put((index,), torch.stack(s_parts))
            z = z.index_put((index,), torch.stack(z_parts))
        ratio = self._total.c + lin @ m + m @ Q_off @ m + Q_diag @ s
        if self._total.z.any():
            ratio = ratio + torch.as_tensor(self._total.z, dtype=dtype, device=device) @ z
        if self._total.Z.any():  # E[[ρ_g = 0] ρ_h] = P(ρ_g = 0) E[ρ_h] for independent groups g ≠ h
            ratio = ratio + z @ Z_off @ m
        return ratio * self.reference_ms if unit == "ms" else ratio

    # ---- serialization
    def to_json(self) -> dict:
        f = self.features
        return {
            "format": FORMAT,
            "fingerprint": f.fingerprint,
            "groups": f.gids,
            "channels": f.channels.astype(int).tolist(),
            "features": {
                n: q.to_json() | {"scale": sc} for n, q, sc in zip(f.names, f.quads, f.scale, strict=True)
            },
            "theta": {"intercept": float(self.theta[0])}
            | {n: float(t) for n, t in zip(f.names, self.theta[1:], strict=True)},
            "reference_ms": self.reference_ms,
            "target": self.target,
            "report": {k: getattr(self.report, k) for k in self.report.__dataclass_fields__},
            "data": [{"widths": {str(g): w for g, w in ws.items()}, "ratio": r} for ws, r in self.data],
        }

    @classmethod
    def from_json(cls, d: Mapping, cg: ChannelGraph | None = None) -> LatencyPredictor:
        """Inverse of `to_json`; with `cg`, refuses a predictor made for another model (fingerprint)."""
        try:
            if d.get("format") != FORMAT:
                raise LatencyError(
                    f"not a latency predictor file (format {d.get('format')!r}, expected {FORMAT})"
                )
            if cg is not None and d["fingerprint"] != cg.fingerprint():
                raise LatencyError(
                    f"latency predictor was fitted for another model (fingerprint {d['fingerprint']}, this model "
                    f"{cg.fingerprint()}); calibrate a new one"
                )
            f = LatencyFeatures.__new__(LatencyFeatures)
            f.fingerprint = d["fingerprint"]
            f.gids = [int(g) for g in d["groups"]]
            f.channels = np.asarray(d["channels"], dtype=np.float64)
            f._col = {gid: i for i, gid in enumerate(f.gids)}
            f.names = list(d["features"])
            f.quads = [_Quad.from_json(q, len(f.gids)) for q in d["features"].values()]
            f.scale = [float(q.get("scale", 1.0)) for q in d["features"].values()]
            f.layers = []
            f._cg = None
            f.build_seconds = 0.0
            theta = [d["theta"]["intercept"]] + [d["theta"].get(n, 0.0) for n in f.names]
            report = FitReport(**d["report"])
            pred = cls(f, np.asarray(theta), float(d["reference_ms"]), report, d.get("target"))
            pred.data = [
                ({int(g): int(w) for g, w in m["widths"].items()}, float(m["ratio"]))
                for m in d.get("data", [])
            ]
            return pred
        except LatencyError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise LatencyError(
                f"corrupt latency predictor ({type(e).__name__}: {e}); calibrate a new one"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, cg: ChannelGraph | None = None) -> LatencyPredictor:
        p = Path(path)
        if not p.is_file():
            raise LatencyError(f"latency predictor {path}: file not found")
        try:
            d = json.loads(p.read_text())
        except ValueError as e:
            raise LatencyError(f"latency predictor {path}: not JSON ({e})") from None
        return cls.from_json(d, cg)


# --------------------------------------------------------------------------------------- calibration
def default_probes(space) -> int:
    """Measurements `calibrate` takes by default: 16, or the number of searched groups + 8 when larger
    (every group needs to move in a few probes), at most 40."""
    return int(min(40, max(16, len(space) + 8)))


def probe_widths(space, n: int | None = None, seed: int = 0) -> list[dict[int, int]]:
    """`n` probe configurations (default `default_probes(space)`): uniform scales spread over the space, then
    random samples.

    About a third are uniform scalings (every group at the same share of its width), the rest random
    samples of `space` (`WidthSpace`) so that the fit sees groups move independently.

    Raises:
        LatencyError: the space has no prunable group.
    """
    if len(space) == 0:
        raise LatencyError("no prunable group; nothing to predict")
    n = n or default_probes(space)
    rng = np.random.default_rng(seed)
    n_uniform = max(2, n // 3) if n >= 4 else n
    lo = min((g.lo / g.hi for g in space), default=1.0)
    scales = np.linspace(max(lo, 0.1), 1.0, n_uniform + 1)[:-1]  # full width is the free reference point
    probes = [space.uniform(float(s)) for s in scales]
    seen = {tuple(sorted(p.items())) for p in probes}
    tries = 0
    while len(probes) < n and tries < 100 * n:
        tries += 1
        w = space.sample(rng)
        k = tuple(sorted(w.items()))
        if k not in seen:
            seen.add(k)
            probes.append(w)
    return probes


def calibrate(
    cg: ChannelGraph,
    reference_onnx,
    target,
    probes: list[dict[int, int]],
    *,
    cache=None,
    measurer=None,
    **budget: Any,
) -> tuple[LatencyPredictor, list[dict]]:
    """Measure the `probes` (`probe_widths`) against the reference (the in-loop measurement, an estimate of the
    ratio as deployed) and fit a predictor on them.

    Args:
        cg: the model's channel graph.
        reference_onnx: the full-width ONNX (ModelProto, bytes or path).
        target: `Target` to measure on.
        probes: the width configurations to measure.
        cache: a `LatencyCache` (measured probes are reused on a later call).
        measurer: a `PairedMeasurer` holding `reference_onnx`; None starts one for this calibration.
        **budget: passed to `measure_candidate` (max_seconds, rel_ci, ...).

    Returns:
        (predictor, the measurement dicts of `measure_candidate`).
    """
    from onnxconet.latency.candidate import measure_candidate, reference_source
    from onnxconet.latency.profile import PairedMeasurer

    own = measurer is None
    if own:
        measurer = PairedMeasurer(reference_source(reference_onnx)[0], target)
    try:
        budget = dict(budget, measurer=measurer)
        results = [measure_candidate(cg, w, reference_onnx, target, cache, **budget) for w in probes]
        return _fit_remeasuring(cg, (reference_onnx, target, budget), probes, results)
    finally:
        if own:
            measurer.close()


def _fit_remeasuring(cg, how: tuple, probes, results):
    """Fit on the probes' ratios; a probe whose measurement looks disturbed (far off the fit, or flagged) is
    measured twice more and the median kept, then the fit is redone. `how` = (reference, target, budget)."""
    from onnxconet.latency.candidate import measure_candidate

    reference_onnx, target, budget = how
    features = LatencyFeatures(cg)
    ref_ms = float(np.median([r["reference_ms"] for r in results]))
    tgt = {k: results[0][k] for k in ("provider", "threads", "batch", "onnxruntime") if k in results[0]}
    tgt["method"] = PAIRED
    tgt["device"] = target.device_name  # a predictor of one device never serves another
    ratios = [r["ratio"] for r in results]
    pred = LatencyPredictor.fit(features, probes, ratios, ref_ms, target=tgt)
    suspects = outliers(np.asarray(pred.predict_ratio(probes)), np.asarray(ratios))
    flagged = [i for i, r in enumerate(results) if r.get("disturbed")]  # other programs took the cores
    suspects = np.union1d(suspects, np.asarray(flagged, dtype=np.int64)).astype(np.int64)
    if len(suspects):  # a disturbed measurement, not the model: measure twice more, keep the median of 3
        for i in suspects.tolist():
            again = [
                measure_candidate(cg, probes[i], reference_onnx, target, None, **budget)["ratio"]
                for _ in range(2)
            ]
            log.info("latency probe %d: %.3f looked disturbed; re-measured %s", i, ratios[i], again)
            ratios[i] = float(np.median([ratios[i], *again]))
            results[i] = dict(results[i], ratio=ratios[i], remeasured=again)
        extra = 2 * len(suspects)
        pred = LatencyPredictor.fit(features, probes, ratios, ref_ms, target=tgt)
        pred.report.measurements += extra
        pred.report.remeasured = len(suspects)
    return pred, results


def outliers(predicted: np.ndarray, measured: np.ndarray, floor: float = 0.08, k: float = 4.0) -> np.ndarray:
    """Indices of measurements whose relative residual to the fit exceeds max(`floor`, k × the median one).

    Measured on the 2-core CI kind (mobilenet_v2, 1 thread, 1.5 s per measurement): about one measurement in
    15 came out 20-26 % slower than its retest while the rest agreed within 3 %; such a probe pulls the fit.
    """
    r = np.abs(predicted - measured) / measured
    if len(r) < 8:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(r > max(floor, k * float(np.median(r))))[0]
