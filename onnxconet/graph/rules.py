"""Per-op channel rules: how each ONNX op moves, creates, ties or freezes channel slots.

Each rule reads its inputs' channel maps from the analysis context and writes its outputs' maps; it records
parameter slices (members) and ties. An op without a rule freezes every channel that reaches it: we never
assume an unknown op is element-wise. The README's "How it works" and docs/architecture.md place this in the whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from onnxconet.graph.chanmap import ChanMap, reshape_map, tie_rectangular
from onnxconet.graph.ir import Node

if TYPE_CHECKING:
    from onnxconet.graph.analysis import Analyzer

Rule = Callable[["Analyzer", Node], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- producers
@dataclass(frozen=True)
class _Layout:
    """Where a producer's channels live: `x_axis` of its input x, `in_axis`/`out_axis` of its weight (consumed /
    produced channels), `out_rank_axis` of its output; `groups` > 1 for a grouped conv."""

    x_axis: int
    in_axis: int
    out_axis: int
    out_rank_axis: int
    groups: int = 1


def _producer(ctx: Analyzer, node: Node, x: str, w: str, lay: _Layout, bias: str | None) -> None:
    """Shared by Conv, ConvTranspose, Gemm and MatMul: `w` consumes x's channels on `in_axis` and produces
    new channels on `out_axis`; `groups` > 1 is a grouped conv (depthwise handled by the caller)."""
    ws = ctx.shape(w)
    x_axis, in_axis, out_axis, groups = lay.x_axis, lay.in_axis, lay.out_axis, lay.groups
    xm = ctx.map(x)
    if xm is not None and not xm.on_axis(x_axis):
        ctx.freeze(xm.ids, f"{node.describe()} reads channels on an axis it does not reduce; input frozen")
        xm = None
    cin_g, cout = ws[in_axis], ws[out_axis]
    if xm is not None:
        if groups > 1:
            tie_rectangular(ctx.uf, xm.ids.reshape(groups, cin_g))
        ctx.member(node, w, in_axis, xm.ids[:cin_g], "consumer")
    ids = ctx.new_source(node, cout)
    if groups > 1:
        tie_rectangular(ctx.uf, ids.reshape(groups, -1))
    ctx.member(node, w, out_axis, ids, "producer")
    if bias:
        # the bias broadcasts against the output, so its channels lie on its last axis (Gemm's C may be [1, N])
        brank = len(ctx.shape(bias) or (0,))
        ctx.channelwise_operand(node, bias, ChanMap((brank - 1,), ids), expect_rank=brank)
    ctx.set(node.outputs[0], ChanMap((lay.out_rank_axis,), ids))


@rule("Conv")
def conv(ctx: Analyzer, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    ws = ctx.shape(w)
    if ws is None or ctx.param_axis(w, 0) is None:
        return ctx.unknown(node, "its weight is not a model parameter")
    group = int(node.attr("group", 1))
    cin = ws[1] * group
    xm = ctx.map(x)
    if group > 1 and group == cin and ws[0] == cin and xm is not None and xm.on_axis(1):
        # depthwise: output channel c is a function of input channel c only, the channels pass through
        ctx.member(node, w, 0, xm.ids, "channelwise")
        if bias:
            ctx.channelwise_operand(node, bias, ChanMap((0,), xm.ids), expect_rank=1)
        ctx.set(node.outputs[0], xm)
        return
    _producer(ctx, node, x, w, _Layout(1, 1, 0, 1, group), bias)


@rule("ConvTranspose")
def conv_transpose(ctx: Analyzer, node: Node) -> None:
    w = node.inputs[1]
    if ctx.shape(w) is None or ctx.param_axis(w, 0) is None:
        return ctx.unknown(node, "its weight is not a model parameter")
    group = int(node.attr("group", 1))
    if group > 1:
        return ctx.unknown(node, "grouped ConvTranspose is not supported")
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    _producer(ctx, node, node.inputs[0], w, _Layout(1, 0, 1, 1), bias)


@rule("Gemm")
def gemm(ctx: Analyzer, node: Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    if ctx.param_axis(b, 0) is None or ctx.shape(b) is None:
        return ctx.unknown(node, "its B operand is not a model parameter")
    if int(node.attr("transA", 0)):
        return ctx.unknown(node, "transA=1 is not supported")
    tb = int(node.attr("transB", 0))
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    _producer(ctx, node, a, b, _Layout(1, 1 if tb else 0, 0 if tb else 1, 1), bias)


@rule("MatMul")
def matmul(ctx: Analyzer, node: Node) -> None:
    a, b = node.inputs
    bs, as_ = ctx.shape(b), ctx.shape(a)
    if bs is None or as_ is None or len(bs) != 2 or ctx.param_axis(b, 0) is None:
        return ctx.unknown(node, "only activation @ weight-matrix is supported")
    out_rank = len(ctx.shape(node.outputs[0]) or as_)
    _producer(ctx, node, a, b, _Layout(len(as_) - 1, 0, 1, out_rank - 1), None)


# ----------------------------------------------------------------------------------------------- channel-wise
@rule("BatchNormalization", "InstanceNormalization")
def batchnorm(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    if not xm.on_axis(1):
        return ctx.unknown(node, "normalizes an axis that is not the channel axis")
    for p in node.inputs[1:]:
        if p:
            ctx.channelwise_operand(node, p, ChanMap((0,), xm.ids), expect_rank=1)
    ctx.set(node.outputs[0], xm)


@rule("LayerNormalization")
def layernorm(ctx: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    xm, xs = ctx.map(x), ctx.shape(x)
    if xm is None:
        return
    rank = len(xs)
    first = int(node.attr("axis", -1)) % rank
    if any(a >= first for a in xm.axes) and not all(a >= first for a in xm.axes):
        return ctx.unknown(node, "normalizes over part of a multi-axis channel map")
    if xm.axes[0] >= first:
        shifted = xm.shifted(-first)
        for p in node.inputs[1:3]:
            if p:
                ctx.channelwise_operand(node, p, shifted, expect_rank=rank - first)
    ctx.set(node.outputs[0], xm)


# ----------------------------------------------------------------------------------------------- pass-through
PASS_THROUGH = (
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Softplus",
    "Softsign",
    "Mish",
    "Erf",
    "Exp",
    "Log",
    "Abs",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Not",
    "IsNaN",
    "IsInf",
    "Dropout",
    "Identity",
    "Cast",
    "CastLike",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LpPool",
    "GlobalLpPool",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "Swish",
)


@rule(*PASS_THROUGH)
def pass_through(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    if node.op in ("Softmax", "LogSoftmax", "Hardmax"):
        rank = len(ctx.shape(node.inputs[0]) or ())
        if int(node.attr("axis", -1)) % max(rank, 1) in xm.axes:
            return ctx.unknown(node, "normalizes over the channel axis")
    rank = len(ctx.shape(node.inputs[0]) or ())
    for o in node.outputs:  # pooling keeps the layout; MaxPool's indices output too; Dropout's mask too
        if o and len(ctx.shape(o) or ()) == rank:
            ctx.set(o, xm)


@rule("Resize", "Upsample")
def resize(ctx: Analyzer, node: Node) -> None:
    """Pass-through when the channel axes keep their extent (scale 1); surgery rewrites a constant `sizes`."""
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    if node.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return ctx.unknown(node, "crops with a region of interest")
    xs, os_ = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if xs is None or os_ is None or len(xs) != len(os_):
        return ctx.unknown(node, "its output shape is unknown")
    if any(xs[a] is None or os_[a] != xs[a] for a in xm.axes):
        return ctx.unknown(node, "resizes the channel axis")
    ctx.set(node.outputs[0], xm)


@rule("Pad")
def pad(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    pads = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attr("pads", []))
    rank = len(ctx.shape(node.inputs[0]))
    axes = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else np.arange(rank)
    if pads is None or axes is None:
        return ctx.unknown(node, "its pads are not constant")
    n = len(axes)
    for k, a in enumerate(np.asarray(axes) % rank):
        if a in xm.axes and (pads[k] != 0 or pads[k + n] != 0):
            return ctx.unknown(node, "pads the channel axis")
    ctx.set(node.outputs[0], xm)


# ----------------------------------------------------------------------------------------------- element-wise
@rule(
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Pow",
    "Sum",
    "Mean",
    "Where",
    "PRelu",
    "Equal",
    "Greater",
    "Less",
    "And",
    "Or",
    "Mod",
    "BitShift",
)
def elementwise(ctx: Analyzer, node: Node) -> None:
    out = node.outputs[0]
    os_ = ctx.shape(out)
    if os_ is None:
        return ctx.unknown(node, "its output shape is unknown")
    rank = len(os_)
    maps, consts = [], []
    for i in node.inputs:
        if not i:
            continue
        m, s = ctx.map(i), ctx.shape(i)
        if s is None:
            return ctx.unknown(node, f"the shape of input '{i}' is unknown")
        if m is not None:
            m = m.shifted(rank - len(s))
            # a size-1 channel axis broadcast over many channels is not tied to them
            if all(os_[a] == m.ids.shape[k] for k, a in enumerate(m.axes)):
                maps.append(m)
        else:
            consts.append((i, len(s)))
    if not maps:
        return
    first = maps[0]
    for m in maps[1:]:
        if m.axes != first.axes:
            for mm in maps:
                ctx.freeze(mm.ids, f"{node.describe()} combines tensors whose channels lie on different axes")
            ctx.set(out, first)
            return
        ctx.uf.union_arrays(first.ids, m.ids)
    for name, r in consts:
        ctx.channelwise_operand(node, name, first.shifted(r - rank), expect_rank=r, optional=True)
    ctx.set(out, first)


# ----------------------------------------------------------------------------------------------- layout
@rule("Transpose")
def transpose(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    rank = len(ctx.shape(node.inputs[0]))
    perm = list(node.attr("perm", list(range(rank))[::-1]))
    new_axes = [perm.index(a) for a in xm.axes]
    order = np.argsort(new_axes)
    ctx.set(node.outputs[0], ChanMap(tuple(int(new_axes[k]) for k in order), np.transpose(xm.ids, order)))


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    ins, outs = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if ins is None or outs is None or None in ins or None in outs:
        return ctx.unknown(node, "its input or output shape is not static")
    new = reshape_map(xm, tuple(ins), tuple(outs))
    if new is None:
        return ctx.unknown(node, "mixes the channel axis with other axes in a way that cannot be sliced")
    tie_rectangular(ctx.uf, new.ids)
    ctx.set(node.outputs[0], new)


@rule("Expand")
def expand(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    ins, outs = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if ins is None or outs is None:
        return ctx.unknown(node, "its shapes are unknown")
    m = xm.shifted(len(outs) - len(ins))
    if any(outs[a] != m.ids.shape[k] for k, a in enumerate(m.axes)):
        return ctx.unknown(node, "expands the channel axis")
    ctx.set(node.outputs[0], m)


@rule(
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)
def reduce(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    rank = len(ctx.shape(node.inputs[0]))
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = ctx.const(node.inputs[1])
        if axes is None:
            return ctx.unknown(node, "its axes are not constant")
    else:
        axes = node.attr("axes", None)
    axes = (
        set(range(rank)) if axes is None or len(axes) == 0 else {int(a) % rank for a in np.atleast_1d(axes)}
    )
    kept = [k for k, a in enumerate(xm.axes) if a not in axes]
    if not kept:
        return  # reduced over the channels: the output carries none
    if len(kept) != len(xm.axes):
        return ctx.unknown(node, "reduces part of a multi-axis channel map")
    if int(node.attr("keepdims", 1)):
        ctx.set(node.outputs[0], xm)
    else:
        ctx.set(node.outputs[0], ChanMap(tuple(a - sum(1 for r in axes if r < a) for a in xm.axes), xm.ids))


@rule("Concat")
def concat(ctx: Analyzer, node: Node) -> None:
    out = node.outputs[0]
    os_ = ctx.shape(out)
    ins = [i for i in node.inputs if i]
    maps = [ctx.map(i) for i in ins]
    if all(m is None for m in maps):
        return
    if os_ is None:
        return ctx.unknown(node, "its output shape is unknown")
    axis = int(node.attr("axis")) % len(os_)
    if any(m is not None and axis in m.axes for m in maps):
        if any(m is not None and not m.on_axis(axis) for m in maps):
            return ctx.unknown(node, "concatenates multi-axis channel maps")
        parts = []
        for i, m in zip(ins, maps, strict=True):
            if m is None:  # a constant block of channels: keep it as it is
                parts.append(
                    ctx.new_source(
                        node, ctx.shape(i)[axis], frozen=f"{node.describe()} concatenates constant channels"
                    )
                )
            else:
                parts.append(m.ids)
        ctx.set(out, ChanMap((axis,), np.concatenate(parts)))
        return
    # concatenation along a non-channel axis: every input must hold the same channels
    first = next(m for m in maps if m is not None)
    for i, m in zip(ins, maps, strict=True):
        if m is None:
            ctx.channelwise_operand(node, i, first, expect_rank=len(os_), optional=True)
        elif m.axes != first.axes:
            return ctx.unknown(node, "concatenates tensors whose channels lie on different axes")
        else:
            ctx.uf.union_arrays(first.ids, m.ids)
    ctx.set(out, first)


def _split_sizes(ctx: Analyzer, node: Node, axis_len: int, n_out: int) -> list[int] | None:
    split = ctx.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else node.attr("split")
    if split is None:
        if node.op == "SplitToSequence":
            return [1] * axis_len
        k = int(node.attr("num_outputs", n_out))
        size = -(-axis_len // k)
        return [min(size, axis_len - size * j) for j in range(k)]
    split = np.asarray(split)
    if split.ndim == 0:  # chunk size
        s = int(split)
        return [min(s, axis_len - s * j) for j in range(-(-axis_len // s))]
    return [int(v) for v in split]


def _split_maps(ctx: Analyzer, node: Node) -> list[ChanMap | None] | None:
    xm = ctx.map(node.inputs[0])
    xs = ctx.shape(node.inputs[0])
    axis = int(node.attr("axis", 0)) % len(xs)
    if axis not in xm.axes:
        return None
    if not xm.on_axis(axis):
        ctx.unknown(node, "splits a multi-axis channel map")
        return []
    sizes = _split_sizes(ctx, node, xs[axis], len(node.outputs))
    if sizes is None or len(set(sizes)) != 1:
        ctx.unknown(node, f"splits the channels into unequal parts {sizes}; only equal chunks are supported")
        return []
    parts = np.split(xm.ids, np.cumsum(sizes)[:-1])
    # torch.chunk/split recompute equal chunks from the pruned size: the chunks must keep the same positions
    tie_rectangular(ctx.uf, np.stack(parts))
    return [ChanMap((axis,), p) for p in parts]


@rule("Split")
def split(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    parts = _split_maps(ctx, node)
    for k, o in enumerate(node.outputs):
        if parts is None:
            ctx.set(o, xm)
        elif parts:
            ctx.set(o, parts[k])


@rule("SplitToSequence")
def split_to_sequence(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    if not int(node.attr("keepdims", 1)):
        return ctx.unknown(node, "keepdims=0 is not supported")
    parts = _split_maps(ctx, node)
    if parts is None:
        ctx.seqs[node.outputs[0]] = "same", xm
    elif parts:
        ctx.seqs[node.outputs[0]] = "parts", parts


@rule("SequenceAt")
def sequence_at(ctx: Analyzer, node: Node) -> None:
    seq = ctx.seqs.get(node.inputs[0])
    if seq is None:
        return
    kind, val = seq
    if kind == "same":
        ctx.set(node.outputs[0], val)
        return
    pos = ctx.const(node.inputs[1])
    if pos is None:
        for m in val:
            ctx.freeze(m.ids, f"{node.describe()} reads a sequence at a non-constant position")
        return
    ctx.set(node.outputs[0], val[int(pos)])


@rule("Slice")
def slice_(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    xs = ctx.shape(node.inputs[0])
    starts, ends = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
    axes = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    steps = ctx.const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    if starts is None or ends is None or (len(node.inputs) > 4 and node.inputs[4] and steps is None):
        return ctx.unknown(node, "its bounds are not constant")
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes) % len(xs)
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
    for k, a in enumerate(axes):
        if a not in xm.axes:
            continue
        # the channel axis passes only when every position is taken, in order (a step of 2 or -1 is not)
        taken = range(*slice(int(starts[k]), int(ends[k]), int(steps[k])).indices(xs[a]))
        if taken != range(xs[a]):
            return ctx.unknown(node, "slices the channel axis with fixed bounds")
    ctx.set(node.outputs[0], xm)


@rule("Gather")
def gather(ctx: Analyzer, node: Node) -> None:
    xm = ctx.map(node.inputs[0])
    if xm is None:
        return
    xs = ctx.shape(node.inputs[0])
    axis = int(node.attr("axis", 0)) % len(xs)
    if axis in xm.axes:
        return _gather_channels(ctx, node, xm, axis)
    idx = ctx.shape(node.inputs[1])
    if idx is None:
        return ctx.unknown(node, "its indices shape is unknown")
    shift = len(idx) - 1
    ctx.set(node.outputs[0], ChanMap(tuple(a + shift if a > axis else a for a in xm.axes), xm.ids))


def _gather_channels(ctx: Analyzer, node: Node, xm: ChanMap, axis: int) -> None:
    """Gather along the channel axis with constant indices (e.g. the exporter's `as_strided`): the output holds
    the indexed channels; the surgery rewrites the indices to the kept positions."""
    idx = ctx.const(node.inputs[1])
    if idx is None or not xm.on_axis(axis) or idx.ndim == 0:
        return ctx.unknown(
            node, "gathers along the channel axis with indices that are not a constant selection"
        )
    block = np.take(xm.ids, np.asarray(idx, dtype=np.int64) % len(xm.ids))
    varying = [k for k in range(block.ndim) if not np.all(block == np.take(block, [0], axis=k))]
    if len(varying) != 1:
        return ctx.unknown(node, "gathers channels into several axes")
    k = varying[0]
    ids = block[tuple(slice(None) if d == k else 0 for d in range(block.ndim))]
    ctx.set(node.outputs[0], ChanMap((axis + k,), ids))


@rule("Shape", "Size")
def shape_only(ctx: Analyzer, node: Node) -> None:
    """Reads only the shape: the pruned tensor's shape flows into whatever is computed from it."""
