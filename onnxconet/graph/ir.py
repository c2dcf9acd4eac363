"""A small read-only view of an ONNX graph: nodes, static shapes, initializers, constant folding.

Built straight from the protobuf (no weight copies), so reading a ResNet-50 takes milliseconds. Nodes keep
the module path the dynamo exporter records in their metadata, so messages can name torch modules.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxconet.errors import GraphError
from onnxconet.files import atomic_write, write_error

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass
class Node:
    """One ONNX node. `scope` is the torch module path ("layer1.0.conv1") when the exporter recorded it."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, object]
    scope: str = ""
    domain: str = ""

    def attr(self, key: str, default=None):
        return self.attrs.get(key, default)

    def describe(self) -> str:
        where = f", {self.scope}" if self.scope else ""
        return f"node '{self.name}' ({self.op}{where})"


def _scope(node: onnx.NodeProto) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)  # a list literal of strings
                return str(scopes[-2]) if len(scopes) > 1 else ""
            except Exception:  # noqa: BLE001 - metadata is informational only
                return ""
        if p.key == "namespace":
            # ": Net/layer1: Sequential/layer1.0.conv1: Conv2d/conv2d_1: aten.conv2d" -> "layer1.0.conv1"
            parts = [s.split(":")[0].strip() for s in p.value.split("/")]
            mods = [s for s in parts[1:-1] if s]
            return mods[-1] if mods else ""
    return ""


_T = onnx.TensorProto
# element types narrower than a byte, packed: their bits per element
_PACKED = {
    getattr(_T, n): bits
    for n, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(_T, n)
}
_COMPLEX = {_T.COMPLEX64, _T.COMPLEX128}


def _check_tensor(t: onnx.TensorProto, where: str) -> None:
    """A tensor's element type is known and its data holds as many values as its dims say (external data
    already loaded); raises GraphError naming it otherwise. Reads sizes only: nothing is allocated, so a
    damaged header declaring 2**62 values costs nothing."""
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise GraphError(f"{where} has negative dims {dims}; the file is damaged, re-export the model")
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # noqa: BLE001 - KeyError for an unknown type code
        raise GraphError(
            f"{where} has an unknown element type (code {t.data_type}); the file is damaged, re-export the model"
        ) from None
    if t.data_type == _T.STRING or t.data_location == _T.EXTERNAL or t.HasField("segment"):
        return
    n = 1
    for d in dims:
        n *= d
    typed = max(
        len(t.float_data), len(t.double_data), len(t.int32_data), len(t.int64_data), len(t.uint64_data)
    )
    if t.raw_data:
        bits = _PACKED.get(t.data_type)
        have, want, unit = len(t.raw_data), (n * bits + 7) // 8 if bits else n * itemsize, "bytes"
    elif t.data_type in _PACKED:
        return  # packed differently per type in the typed fields
    else:
        have, want, unit = typed, 2 * n if t.data_type in _COMPLEX else n, "values"
    if have != want:
        raise GraphError(
            f"{where} declares dims {dims} of {onnx.helper.tensor_dtype_to_string(t.data_type)} ({want} {unit}) "
            f"but holds {have} {unit}; the file is damaged or truncated, re-export the model"
        )


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _attr_value(a: onnx.AttributeProto):
    if a.type == onnx.AttributeProto.TENSOR:
        _check_tensor(a.t, f"tensor attribute '{a.name}'")
        return numpy_helper.to_array(a.t)
    if a.type == onnx.AttributeProto.GRAPH or a.type == onnx.AttributeProto.GRAPHS:
        return a  # subgraphs are not analysed; ops that carry them are unknown ops
    v = onnx.helper.get_attribute_value(a)
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class Graph:
    """Read-only view over `model.graph`, topologically ordered as ONNX requires."""

    model: onnx.ModelProto
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    shapes: dict[str, Shape | None] = field(default_factory=dict)
    producer: dict[str, Node] = field(default_factory=dict)
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    _consts: dict[str, np.ndarray | None] = field(default_factory=dict)
    _inferred: bool = False
    source: str = "<model>"  # the file or spec, for messages

    @classmethod
    def from_model(cls, model: onnx.ModelProto, source: str = "<model>") -> Graph:
        g = model.graph
        if not g.node:
            raise GraphError(f"{source}: the ONNX graph has no nodes; re-export the model")
        shapes = _collect_shapes(model)
        view = cls(model=model, shapes=shapes, source=source)
        view.initializers = {t.name: t for t in g.initializer}
        for t in g.initializer:
            _check_tensor(t, f"{source}: initializer '{t.name}'")
            view.shapes[t.name] = tuple(int(d) for d in t.dims)
        for node in g.node:
            name = node.name or f"{node.op_type}_{len(view.nodes)}"
            try:
                attrs = {a.name: _attr_value(a) for a in node.attribute}
            except GraphError as e:
                raise GraphError(f"{source}: node '{name}' ({node.op_type}): {e}") from None
            except Exception as e:  # noqa: BLE001 - onnx raises many types on a damaged attribute
                raise GraphError(
                    f"{source}: node '{name}' ({node.op_type}) has an unreadable attribute ({_first_line(e)}); "
                    "the file is damaged, re-export the model"
                ) from None
            n = Node(
                name=name,
                op=node.op_type,
                inputs=list(node.input),
                outputs=list(node.output),
                attrs=attrs,
                scope=_scope(node),
                domain=node.domain,
            )
            view.nodes.append(n)
            for o in n.outputs:
                if o:
                    view.producer[o] = n
            for i in n.inputs:
                if i:
                    view.consumers.setdefault(i, []).append(n)
        view.inputs = [i.name for i in g.input if i.name not in view.initializers]
        view.outputs = [o.name for o in g.output]
        return view

    # ----- navigation
    def shape(self, name: str) -> Shape | None:
        """Static shape of a tensor: recorded by the exporter, folded from constants, or (once, lazily, since
        it costs ~0.3 s on a ResNet) inferred by ONNX shape inference."""
        s = self.shapes.get(name)
        if s is not None or not name:
            return s
        val = self.const(name, max_size=1 << 12)
        if val is not None:
            self.shapes[name] = tuple(val.shape)
            return self.shapes[name]
        local = self._local_shape(name)
        if local is not None:
            self.shapes[name] = local
            return local
        if not self._inferred:
            self._inferred = True
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
                self.shapes.update(
                    {
                        k: v
                        for k, v in _collect_shapes(inferred).items()
                        if v is not None and k not in self.shapes
                    }
                )
            except Exception as e:  # noqa: BLE001 - missing shapes are handled per node
                log.warning("ONNX shape inference failed (%s); some groups may freeze", e)
        return self.shapes.get(name)

    def _local_shape(self, name: str) -> Shape | None:
        """Shapes the exporter leaves out that are cheap to compute here (MatMul, broadcasting binary ops)."""
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op == "MatMul":
            a, b = self.shape(node.inputs[0]), self.shape(node.inputs[1])
            if a and b and len(b) == 2 and len(a) >= 2 and None not in a:
                return (*a[:-1], b[1])
        if node.op == "Reshape":
            a, target = self.shape(node.inputs[0]), self.const(node.inputs[1])
            if a is not None and None not in a and target is not None:
                dims = [
                    int(a[i]) if d == 0 and not node.attr("allowzero", 0) else int(d)
                    for i, d in enumerate(target)
                ]
                if dims.count(-1) == 1:
                    known = int(np.prod([d for d in dims if d != -1]))
                    dims[dims.index(-1)] = int(np.prod(a)) // max(known, 1)
                return tuple(dims) if int(np.prod(dims)) == int(np.prod(a)) else None
        if node.op == "Flatten":
            a = self.shape(node.inputs[0])
            if a is not None and None not in a:
                k = int(node.attr("axis", 1)) % (len(a) + 1)
                return (int(np.prod(a[:k])), int(np.prod(a[k:])))
        if node.op == "Transpose":
            a = self.shape(node.inputs[0])
            if a is not None:
                perm = node.attr("perm", list(range(len(a)))[::-1])
                return tuple(a[p] for p in perm)
        if node.op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            shapes = [self.shape(i) for i in node.inputs]
            if all(s is not None and None not in s for s in shapes):
                try:
                    return tuple(int(d) for d in np.broadcast_shapes(*shapes))
                except ValueError:
                    return None
        return None

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def iter_ops(self, ops: Iterable[str]) -> Iterable[Node]:
        s = set(ops)
        return (n for n in self.nodes if n.op in s)

    # ----- constant folding (small integer/float tensors: shapes, axes, split sizes)
    def const(self, name: str, max_size: int = 1 << 16) -> np.ndarray | None:
        """Value of `name` when it is computable from constants alone (or static shapes), else None."""
        if not name:
            return None
        if name in self._consts:
            return self._consts[name]
        self._consts[name] = None  # guards cycles
        val = self._fold(name, max_size)
        self._consts[name] = val
        return val

    def _fold(self, name: str, max_size: int) -> np.ndarray | None:
        if name in self.initializers:
            t = self.initializers[name]
            if int(np.prod(t.dims)) > max_size:
                return None
            return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is None:
            return None
        op = node.op
        if op == "Constant":
            for key in ("value", "value_ints", "value_int", "value_floats", "value_float"):
                if key in node.attrs:
                    return np.asarray(node.attrs[key])
            return None
        if op == "Shape":
            s = self.shape(node.inputs[0])
            if s is None or any(d is None for d in s):
                return None
            arr = np.asarray(s, dtype=np.int64)
            start, end = node.attr("start", 0), node.attr("end", None)
            return arr[start:end]
        args = [self.const(i, max_size) if i else None for i in node.inputs]
        if op in ("Identity", "Cast", "CastLike"):
            if args[0] is None:
                return None
            if op == "Cast":
                return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(node.attr("to")))
            if op == "CastLike" and args[1] is not None:
                return args[0].astype(args[1].dtype)
            return args[0]
        if any(a is None for i, a in zip(node.inputs, args, strict=False) if i):
            return None
        try:
            return _eval_small(node, args)
        except Exception:  # noqa: BLE001 - unfoldable: treated as non-constant
            return None


def _eval_small(node: Node, args: list) -> np.ndarray | None:
    op = node.op
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=node.attr("axis", 0))
    if op == "Reshape":
        return args[0].reshape([int(d) if d != 0 else args[0].shape[i] for i, d in enumerate(args[1])])
    if op == "Unsqueeze":
        out = args[0]
        for ax in sorted(int(a) % (out.ndim + len(args[1])) for a in np.atleast_1d(args[1])):
            out = np.expand_dims(out, ax)
        return out
    if op == "Squeeze":
        return (
            np.squeeze(args[0], axis=tuple(int(a) for a in np.atleast_1d(args[1])))
            if len(args) > 1
            else np.squeeze(args[0])
        )
    if op == "Gather":
        return np.take(args[0], args[1], axis=node.attr("axis", 0))
    if op == "Slice":
        data, starts, ends = args[0], args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        sl = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
            sl[int(a)] = slice(int(s), int(e), int(st))
        return data[tuple(sl)]
    binary = {
        "Add": np.add,
        "Sub": np.subtract,
        "Mul": np.multiply,
        "Div": np.floor_divide,
        "Max": np.maximum,
        "Min": np.minimum,
        "Equal": np.equal,
    }
    if op in binary:
        if op == "Div" and np.issubdtype(args[0].dtype, np.floating):
            return np.divide(args[0], args[1])
        return binary[op](args[0], args[1])
    if op == "Neg":
        return -args[0]
    if op == "Range":
        return np.arange(args[0], args[1], args[2])
    if op == "ConstantOfShape":
        v = node.attr("value")
        fill = np.asarray(v).reshape(-1)[0] if v is not None else np.float32(0)
        return np.full([int(d) for d in args[0]], fill)
    if op == "Expand":
        return args[0] * np.ones([int(d) for d in args[1]], dtype=args[0].dtype)
    if op == "Where":
        return np.where(args[0], args[1], args[2])
    return None


def _collect_shapes(model: onnx.ModelProto) -> dict[str, Shape | None]:
    out: dict[str, Shape | None] = {}
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = None
            continue
        dims = []
        for d in tt.shape.dim:
            # a negative dim_value is invalid ONNX, written by some tools for "unknown": read it as unknown
            dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else None)
        out[vi.name] = tuple(dims)
    return out


def load_onnx(path: str) -> onnx.ModelProto:
    """Load an ONNX file (external data included) with a one-line error naming the file when it is corrupt."""
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf raises many types
        raise GraphError(
            f"{path}: not a readable ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "re-export it or check the file"
        ) from None
    if not model.graph.node:
        raise GraphError(
            f"{path}: not a readable ONNX model (no graph nodes); re-export it or check the file"
        )
    return model


def save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Save a model; past ~1.5 GB of weights the tensors go to an external data file beside it (protobuf
    cannot serialize more than 2 GB in one message)."""
    from pathlib import Path

    p = Path(path)
    size = sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)
    if size <= 1_500_000_000:
        atomic_write(p, model.SerializeToString())  # WriteError: disk full, read-only folder
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(
            model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location=p.name + ".data"
        )
    except OSError as e:
        raise write_error(p, e) from None
