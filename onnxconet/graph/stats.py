"""Params and FLOPs (multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul) of a model or a width plan,
computed from the ONNX graph. Pruning never changes spatial sizes, so a candidate's MACs are the
original's output positions times its sliced weight size: no re-export, no shape inference."""

from __future__ import annotations

import numpy as np
import onnx

from onnxconet.graph.groups import ChannelGraph

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


def _new_shapes(cg: ChannelGraph, keep: np.ndarray | None) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(int(d) for d in t.dims) for name, t in cg.graph.initializers.items()}
    if keep is not None:
        for name, ops in cg.param_slices(keep).items():
            s = list(shapes[name])
            for axis, idx in ops:
                s[axis] = len(idx)
            shapes[name] = tuple(s)
    return shapes


def count_params(cg: ChannelGraph, keep: np.ndarray | None = None) -> int:
    """Elements of the floating-point initializers (weights, biases, norm parameters and statistics)."""
    shapes = _new_shapes(cg, keep)
    return int(
        sum(int(np.prod(shapes[n])) for n, t in cg.graph.initializers.items() if t.data_type in FLOAT_TYPES)
    )


def count_flops(cg: ChannelGraph, keep: np.ndarray | None = None) -> int:
    """MACs of every Conv/ConvTranspose/Gemm/MatMul whose weight is an initializer (batch included)."""
    shapes = _new_shapes(cg, keep)
    g = cg.graph
    total = 0
    for node in g.iter_ops(("Conv", "ConvTranspose", "Gemm", "MatMul")):
        pa = _weight(cg, node)
        if pa is None:
            continue
        positions = output_positions(g, node)
        if positions is not None:
            total += int(positions) * int(np.prod(shapes[pa]))
    return int(total)


def output_positions(g, node) -> float | None:
    """Output positions per output channel of a Conv / ConvTranspose / Gemm / MatMul (batch included): a
    layer's MACs are these times its weight's elements. None when a shape is not static. The one rule that
    MAC counts, the latency predictor's features and dmasking's effective shapes all use."""
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


def _weight(cg: ChannelGraph, node) -> str | None:
    from onnxconet.graph.analysis import Analyzer

    if len(node.inputs) < 2:
        return None
    pa = Analyzer(cg.graph).param_axis(node.inputs[1], 0)
    return pa[0] if pa else None
