"""Slice the exported ONNX graph to a width plan with onnx-graphsurgeon: no torch re-export.

Initializers are sliced along their members' axes; then the few places where the graph spells channel
counts out as constants are rewritten: Reshape/Expand target shapes, Resize sizes, Split/SplitToSequence
sizes and the `group` attribute of depthwise convs. value_info is carried over with the channel axes resized.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxconet.errors import SurgeryError
from onnxconet.graph.branches import LAYERS
from onnxconet.graph.groups import ChannelGraph

log = logging.getLogger(__name__)


def slice_onnx(cg: ChannelGraph, keep: np.ndarray) -> onnx.ModelProto:
    """A new ModelProto with only the kept channels (`keep` from `ChannelGraph.keep_mask`)."""
    t0 = time.perf_counter()
    graph = gs.import_onnx(cg.model)
    tensors = graph.tensors()
    for name, ops in cg.param_slices(keep).items():
        t = tensors[name]
        arr = t.values
        for axis, idx in ops:
            arr = np.take(arr, idx, axis=axis)
        t.values = np.ascontiguousarray(arr)
    for node in graph.nodes:
        _rewrite_node(cg, keep, node)
    folded = _remove_branches(cg, keep, graph)
    graph.cleanup(remove_unused_graph_inputs=False)
    model = gs.export_onnx(graph, do_type_check=False)
    _carry_value_info(cg, keep, model, folded)
    del model.opset_import[:]
    model.opset_import.extend(cg.model.opset_import)
    model.ir_version = cg.model.ir_version
    log.debug("sliced ONNX in %.3f s", time.perf_counter() - t0)
    return model


def _carry_value_info(cg: ChannelGraph, keep: np.ndarray, model: onnx.ModelProto, skip: set[str]) -> None:
    """The original's value_info with the channel axes resized, so shapes stay static for tools (Netron, shape
    inference, a later analysis of this file)."""
    present = {o for n in model.graph.node for o in n.output}
    # tensors whose shape may differ from the original: sliced parameters, channel tensors that lost channels,
    # and everything computed from them (a transposed weight, a sequence of chunks)
    changed = set(cg.param_slices(keep))
    for name, m in cg.maps.items():
        if cg.new_extent(m, keep) != list(m.ids.shape):
            changed.add(name)
    for node in cg.graph.nodes:
        if any(i in changed for i in node.inputs if i):
            changed.update(o for o in node.outputs if o)
    infos = []
    for vi in cg.model.graph.value_info:
        if vi.name not in present or vi.name in skip:
            continue
        vi = onnx.ValueInfoProto.FromString(vi.SerializeToString())
        m = cg.maps.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if m is not None and vi.type.HasField("tensor_type") and len(dims) > max(m.axes):
            for a, n in zip(m.axes, cg.new_extent(m, keep), strict=True):
                dims[a].dim_value = n
        elif vi.name in changed:
            continue  # not a channel tensor but computed from one: its shape is left to shape inference
        infos.append(vi)
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)


def _const_input(node: gs.Node, i: int, values: np.ndarray) -> None:
    # named after the node's first output: tensor names are unique, node names may be empty or repeated
    node.inputs[i] = gs.Constant(f"{node.outputs[0].name}_in{i}_pruned", np.asarray(values))


def _rewrite_extents(cg: ChannelGraph, keep: np.ndarray, node: gs.Node, i: int, axes=None) -> None:
    """Rewrite the channel entries of a shape-like constant input `i` (Reshape/Expand target, Resize sizes)
    to the pruned extents of the node's output. The shape aligns to the output's last axes (Expand's target
    may be shorter), or lists the axes in `axes`."""
    om = cg.maps.get(node.outputs[0].name)
    if om is None or len(node.inputs) <= i or not node.inputs[i].name:
        return
    ext = cg.new_extent(om, keep)
    if ext == list(om.ids.shape):
        return
    target = cg.graph.const(node.inputs[i].name)
    if target is None:
        log.warning("%s: %s is computed at run time; left as is", node.name, node.inputs[i].name)
        return
    target = np.array(target, dtype=np.int64).copy()
    out_rank = len(cg.graph.shape(node.outputs[0].name) or target)
    listed = [int(x) % out_rank for x in axes] if axes is not None else None
    for k, a in enumerate(om.axes):
        if listed is not None:
            pos = listed.index(a) if a in listed else -1
        else:
            pos = a - (out_rank - len(target))
        if pos >= 0 and target[pos] >= 0:  # explicit (or 0 = copy the input's dim): the new extent is right
            target[pos] = ext[k]
    _const_input(node, i, target)


def _rewrite_gather(cg: ChannelGraph, keep: np.ndarray, node: gs.Node) -> None:
    """Constant indices along a channel axis: keep the kept channels' entries, renumbered to new positions."""
    xm, om = cg.maps.get(node.inputs[0].name), cg.maps.get(node.outputs[0].name)
    axis = int(node.attrs.get("axis", 0))
    if xm is None or om is None or not xm.is_1d or (axis % 64) not in [a % 64 for a in xm.axes]:
        return
    kept_in = keep[cg.bundle_of_id[xm.ids]]
    if kept_in.all():
        return
    idx = np.asarray(cg.graph.const(node.inputs[1].name), dtype=np.int64) % len(xm.ids)
    newpos = np.cumsum(kept_in) - 1
    k = om.axes[0] - xm.axes[0]
    mask = keep[cg.bundle_of_id[om.ids]]
    _const_input(node, 1, np.compress(mask, newpos[idx], axis=k).astype(np.int64))


def _rewrite_node(cg: ChannelGraph, keep: np.ndarray, node: gs.Node) -> None:
    op = node.op
    if op in ("Reshape", "Expand"):
        _rewrite_extents(cg, keep, node, 1)
    elif op == "Resize":
        _rewrite_extents(cg, keep, node, 3, node.attrs.get("axes"))  # sizes (scales are 1 on channels)
    elif op == "Gather":
        _rewrite_gather(cg, keep, node)
    elif op == "Split":
        maps = [cg.maps.get(o.name) for o in node.outputs]
        if all(m is not None for m in maps):
            sizes = [cg.new_extent(m, keep)[0] for m in maps]
            if sizes != [len(m.ids) for m in maps]:
                if len(node.inputs) > 1 and node.inputs[1].name:
                    _const_input(node, 1, np.array(sizes, dtype=np.int64))
                elif "split" in node.attrs:
                    node.attrs["split"] = sizes
    elif op == "SplitToSequence":
        seq = cg.seqs.get(node.outputs[0].name)
        if seq is None or seq[0] != "parts":
            return
        sizes = [cg.new_extent(m, keep)[0] for m in seq[1]]
        if sizes == [len(m.ids) for m in seq[1]]:
            return
        old = cg.graph.const(node.inputs[1].name) if len(node.inputs) > 1 else None
        if old is not None and np.ndim(old) == 0:
            _const_input(node, 1, np.array(sizes[0], dtype=np.asarray(old).dtype))
        else:
            _const_input(node, 1, np.array(sizes, dtype=np.int64))
    elif op == "Conv" and int(node.attrs.get("group", 1)) > 1:
        xm = cg.maps.get(node.inputs[0].name)
        w = node.inputs[1]
        if xm is None or not isinstance(w, gs.Constant):
            return
        new_c = cg.new_extent(xm, keep)[0]
        if w.shape[1] == 1 and w.shape[0] == new_c:  # depthwise: one group per channel
            node.attrs["group"] = int(new_c)
        elif new_c % int(node.attrs["group"]) != 0:
            raise SurgeryError(
                f"{node.name}: {new_c} input channels do not split into {node.attrs['group']} groups"
            )


def _remove_branches(cg: ChannelGraph, keep: np.ndarray, graph: gs.Graph) -> set[str]:
    """Groups at width 0 (`graph.branches`): a layer left with no input channel becomes its bias (a constant per
    output channel, shaped to broadcast), which flows through the ops of constants after it into the residual
    merge; the emptied nodes are left unused for `cleanup`. Returns the tensors now computed from constants
    (their shapes changed: their value_info goes)."""
    emptied = cg.emptied(keep)
    if not emptied:
        return set()
    folded: set[str] = set()
    for node in graph.nodes:
        if node.op not in LAYERS or not node.inputs or node.inputs[0].name not in cg.maps:
            continue
        if not cg.groups_of(cg.maps[node.inputs[0].name].ids) <= emptied:
            continue
        out = node.outputs[0]
        om = cg.maps.get(out.name)
        if om is None or cg.groups_of(om.ids) <= emptied:
            continue  # emptied itself (a depthwise conv inside the branch): unused once the branch is folded
        channels = cg.new_extent(om, keep)[0]
        rank = len(cg.graph.shape(out.name) or (0, 0, 0, 0))
        bias = _value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(channels)
        dtype = node.inputs[1].values.dtype
        _replace(
            out,
            gs.Constant(f"{out.name}_removed", bias.astype(dtype).reshape([1, channels] + [1] * (rank - 2))),
        )
        folded.add(f"{out.name}_removed")
    graph.toposort()
    for node in graph.nodes:  # the ops of constants after it stay (a trained BatchNorm's new statistics reach
        # them by name); onnxruntime folds them when it loads the file
        if not any(i.name in folded for i in node.inputs):
            continue
        if all(isinstance(i, gs.Constant) or i.name in folded or not i.name for i in node.inputs):
            folded.update(o.name for o in node.outputs)
        elif node.op not in ("Add", "Sum"):
            raise SurgeryError(f"{node.name}: a removed branch reaches a {node.op}, not a residual Add")
    return folded


def _replace(t: gs.Tensor, c: gs.Constant) -> None:
    for consumer in list(t.outputs):
        for k, i in enumerate(consumer.inputs):
            if i is t:
                consumer.inputs[k] = c


def _value(t: gs.Tensor) -> np.ndarray:
    """A tensor computed from constants only (the exporter's run-time conv bias), evaluated."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = t.inputs[0]
    return _run(node, [_value(i) if i.name else None for i in node.inputs])[node.outputs.index(t)]


def _run(node: gs.Node, values: list) -> list[np.ndarray]:
    """One node on constant inputs, with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{k}" if v is not None else "" for k, v in enumerate(values)]
    outs = [f"out{k}" for k in range(len(node.outputs))]
    attrs = {}
    for k, v in node.attrs.items():
        if isinstance(v, gs.Constant):
            v = onnx.numpy_helper.from_array(np.asarray(v.values))
        elif isinstance(v, (np.dtype, type)):
            v = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(v))
        attrs[k] = v
    proto = onnx.helper.make_node(node.op, names, outs, domain=node.domain or None, **attrs)
    feeds = {n: v for n, v in zip(names, values, strict=True) if n}
    return ReferenceEvaluator(proto).run(None, feeds)


def check_onnx(model: onnx.ModelProto) -> None:
    """onnx.checker with a one-line error."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(f"the sliced ONNX model is invalid: {str(e).splitlines()[0]}") from None
