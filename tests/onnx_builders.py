"""Helpers to hand-build tiny ONNX graphs (onnx.helper, opset 20, float32) and check channel surgery on them.

Initializers are named like torch state_dict keys ("conv1.weight", "bn1.running_mean") so groups report module
names as they do for exported models. `GraphBuilder` methods return output tensor names, so graphs read like
forward passes. `check_surgery` compares the sliced model (onnxruntime) with the oracle: the original graph with
the removed channels' producer rows, biases and per-channel parameters zeroed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxconet.graph.groups import ChannelGraph
from onnxconet.surgery.onnx import slice_onnx

OPSET = 20


class GraphBuilder:
    """Accumulates nodes and initializers; `x` is the graph input [1, c, h, w]."""

    def __init__(self, c: int = 3, h: int = 6, w: int = 6, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.domains: set[str] = set()
        self.input_shape = (1, c, h, w)
        self.x = "x"
        self._count: dict[str, int] = {}

    # ----- tensors
    def init(self, name: str, arr) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def param(self, name: str, shape: Sequence[int], positive: bool = False) -> str:
        if positive:
            arr = self.rng.uniform(0.5, 1.5, size=shape)
        else:
            arr = self.rng.normal(0.0, 1.0, size=shape)
        return self.init(name, arr.astype(np.float32))

    def const(self, arr, dtype=None) -> str:
        """A Constant node (not a parameter)."""
        arr = np.asarray(arr, dtype=dtype)
        (out,) = self.op("Constant", [], value=numpy_helper.from_array(arr))
        return out

    def ints(self, values, name: str | None = None) -> str:
        """An int64 constant: an initializer when `name` is given, else a Constant node."""
        arr = np.asarray(values, dtype=np.int64)
        return self.init(name, arr) if name else self.const(arr)

    # ----- nodes
    def op(
        self,
        op: str,
        inputs: Sequence[str],
        n_out: int = 1,
        name: str | None = None,
        domain: str = "",
        **attrs,
    ):
        """Add a node; returns the list of its output names (named after the node)."""
        if name is None:
            k = self._count.get(op, 0)
            self._count[op] = k + 1
            name = f"{op.lower()}{k}"
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs))
        if domain:
            self.domains.add(domain)
        return outs

    def op1(self, op: str, inputs: Sequence[str], name: str | None = None, **attrs) -> str:
        return self.op(op, inputs, 1, name, **attrs)[0]

    def conv(
        self,
        x: str,
        mod: str,
        cin: int,
        cout: int,
        k: int = 1,
        group: int = 1,
        bias: bool = True,
        **attrs,
    ) -> str:
        w = self.param(f"{mod}.weight", (cout, cin // group, k, k))
        ins = [x, w] + ([self.param(f"{mod}.bias", (cout,))] if bias else [])
        pads = attrs.pop("pads", [k // 2] * 4)
        return self.op1("Conv", ins, name=mod, group=group, kernel_shape=[k, k], pads=pads, **attrs)

    def bn(self, x: str, mod: str, c: int) -> str:
        ins = [
            x,
            self.param(f"{mod}.weight", (c,)),
            self.param(f"{mod}.bias", (c,)),
            self.param(f"{mod}.running_mean", (c,)),
            self.param(f"{mod}.running_var", (c,), positive=True),
        ]
        return self.op1("BatchNormalization", ins, name=mod, epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op1("Relu", [x])

    def build(self, outputs: Iterable[str], infer: bool = False) -> onnx.ModelProto:
        """The model; `infer` records intermediate shapes in value_info (as the exporter does)."""
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info(self.x, TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.inits,
        )
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        if infer:
            return inferred
        # output shapes only (the exporter always records them); intermediate shapes are left to the analysis
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        return model

    def input_data(self, seed: int = 1) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=self.input_shape).astype(np.float32)


# --------------------------------------------------------------------------------------------- queries
def groups_of(cg: ChannelGraph, param: str, axis: int = 0) -> set[int]:
    """Group ids held by one parameter axis."""
    m = cg.members[(param, axis)]
    return set(np.unique(cg.group_of_bundle[cg.bundle_of_id[m.ids]]).tolist())


def gid(cg: ChannelGraph, param: str, axis: int = 0) -> int:
    """The single group of a parameter axis (asserts it is one)."""
    gs = groups_of(cg, param, axis)
    assert len(gs) == 1, f"{param}[{axis}] spans groups {gs}"
    return gs.pop()


def tensor_gid(cg: ChannelGraph, tensor: str) -> int:
    m = cg.maps[tensor]
    gs = set(np.unique(cg.group_of_bundle[cg.bundle_of_id[m.ids]]).tolist())
    assert len(gs) == 1, f"tensor {tensor} spans groups {gs}"
    return gs.pop()


def partition(cg: ChannelGraph) -> dict[frozenset[str], tuple[int, int, bool]]:
    """{producer modules of a group: (channels, divisor, prunable)} over groups that have producers."""
    out = {}
    for g in cg.groups:
        if g.modules:
            key = frozenset(g.modules)
            assert key not in out
            out[key] = (g.channels, g.divisor, g.prunable)
    return out


def drop_mask(cg: ChannelGraph, drops: dict[int, Sequence[int]]) -> np.ndarray:
    """keep_mask that removes exactly the given bundle positions (in group order) of each group."""
    scores = np.ones(len(cg.group_of_bundle))
    widths = {}
    for g_id, pos in drops.items():
        g = cg.groups[g_id]
        scores[g.bundles[list(pos)]] = 0.0
        widths[g_id] = g.channels - len(pos) * g.divisor
    keep = cg.keep_mask(widths, scores)
    for g_id, pos in drops.items():
        g = cg.groups[g_id]
        assert not keep[g.bundles[list(pos)]].any()
        assert keep[g.bundles].sum() == len(g.bundles) - len(pos)
    return keep


# --------------------------------------------------------------------------------------------- running
def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def zeroed_model(cg: ChannelGraph, keep: np.ndarray) -> onnx.ModelProto:
    """The oracle: the original model with the removed channels' producer rows and channel-wise parameters
    (biases, BN gamma/beta/mean, scales) zeroed; running_var is left alone."""
    model = onnx.ModelProto()
    model.CopyFrom(cg.model)
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for (param, axis), m in cg.members.items():
        if m.role not in ("producer", "channelwise") or param.endswith("running_var"):
            continue
        gone = np.nonzero(~keep[cg.bundle_of_id[m.ids]])[0]
        if len(gone):
            idx = [slice(None)] * arrays[param].ndim
            idx[axis] = gone
            arrays[param][tuple(idx)] = 0
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return model


def check_surgery(cg: ChannelGraph, keep: np.ndarray, x: np.ndarray, atol: float = 1e-5) -> onnx.ModelProto:
    """Slice, check, run in onnxruntime, compare with the zeroed oracle; returns the sliced model."""
    sliced = slice_onnx(cg, keep)
    onnx.checker.check_model(sliced, full_check=True)
    got = run_ort(sliced, x)
    want = run_ort(zeroed_model(cg, keep), x)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    return sliced


def init_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def small_cnn(
    width: int = 8, layers: int = 1, batch: int | str = 1, hw: int | str = 16, seed: int = 0
) -> onnx.ModelProto:
    """Conv 3->width 3x3 (+ layers-1 Conv width->width) + Relu + GlobalAveragePool + Flatten + Gemm -> 10."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        cin = 3 if i == 0 else width
        w = rng.standard_normal((width, cin, 3, 3)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((10, width)).astype(np.float32), "fc.weight"))
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def small_residual() -> onnx.ModelProto:
    """Conv-Relu-Conv-Add-GlobalAveragePool-Flatten-Gemm on a 1x3x8x8 input (two prunable groups)."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        init("conv1.weight", 8, 3, 3, 3), init("conv1.bias", 8), init("conv2.weight", 8, 8, 3, 3),
        init("conv2.bias", 8), init("fc.weight", 4, 8), init("fc.bias", 4),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
