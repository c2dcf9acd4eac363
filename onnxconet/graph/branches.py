"""Groups that may take width 0: a residual branch removed whole (depth pruning through the channel graph).

At a low latency budget, every layer's fixed cost (a node's launch, its memory passes) decides what fits: on
ResNet-20 at 1 thread every group at its narrowest still costs 0.23 of the full model. Removing a residual
branch removes those costs; the channel graph expresses it as one more width: 0.

A group may go to 0 when the graph still computes without its channels. Starting from its producers' outputs
(tensors that hold only this group's channels, *empty* once it is 0), every consumer must be

- a per-channel op whose output holds only this group's channels again (BatchNormalization, Relu, a depthwise
  conv, ...): empty,
- or a layer (Conv, weight initializer, one group) reading the empty tensor as its data: with no input channel
  it outputs its bias (0 without one) at every position, a *constant* per output channel;

and every constant must flow through ops of constants (the per-channel BatchNormalization after the layer) into
an op with a non-constant input: the residual Add, where the branch becomes a per-channel offset. Nothing
empty or constant may be a graph output. `surgery.onnx` folds the constants into that Add; `surgery.torch`
swaps the emptied modules for ones that compute the same (a layer with no input channel gives its bias).
"""

from __future__ import annotations

from onnxconet.graph.ir import Node

# ops that map channel c of their first input to channel c of their output, other inputs constant
CHANNELWISE = {
    "BatchNormalization", "InstanceNormalization", "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Silu", "Elu", "Selu", "Tanh", "Identity", "Dropout", "Mul", "Add", "Sub", "Div",
}  # fmt: skip
LAYERS = {"Conv"}


def removable_groups(cg) -> dict[int, tuple[str, ...]]:
    """The prunable groups of `cg` (a ChannelGraph) that may take width 0 (see the module docstring), each with
    the names of the nodes that go with its branch."""
    out = {}
    for g in cg.prunable:
        nodes, _ = _branch(cg, g.id)
        if nodes:
            out[g.id] = nodes
    return out


def branch_exits(cg, gid: int) -> tuple[str, ...]:
    """The tensors through which group `gid`'s removable branch reaches its residual merge (the constants the
    merge receives once the group is 0: ResNet's last BatchNorm output of the block); () when it cannot go.
    Scaling these by a factor fades the whole branch out (dmasking's gate for width 0)."""
    return _branch(cg, gid)[1]


def _only_group(cg, name: str, gid: int) -> bool:
    m = cg.maps.get(name)
    if m is None or not m.is_1d or m.axes != (1,) or not len(m.ids):
        return False
    return cg.groups_of(m.ids) == {gid}


def _const_inputs(cg, node: Node, skip: str) -> bool:
    """All inputs but `skip` are initializers or folded constants (the op's parameters)."""
    g = cg.graph
    return all(not i or i == skip or g.is_initializer(i) or g.const(i) is not None for i in node.inputs)


def _branch(cg, gid: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the nodes removed with group `gid` at width 0, the branch's tensors that feed the merge), or ((), ())
    when it cannot go."""
    graph = cg.graph
    starts = set()
    for (param, _axis), m in cg.members.items():
        if m.role == "producer" and gid in cg.groups_of(m.ids):
            for node in graph.consumers.get(param, []):
                if node.op == "Shape":
                    continue  # the exporter's run-time bias (zeros shaped like the weight's rows)
                if node.op not in LAYERS or node.inputs[1] != param:
                    return (), ()
                starts.add(node.outputs[0])
    if not starts:
        return (), ()
    empty, const, exits = set(), set(), set()
    todo = [(t, "empty") for t in sorted(starts)]
    while todo:
        t, kind = todo.pop()
        if t in empty or t in const:
            continue
        if t in graph.outputs:
            return (), ()
        if kind == "empty":
            if not _only_group(cg, t, gid):
                return (), ()
            empty.add(t)
        else:
            const.add(t)
        for node in graph.consumers.get(t, []):
            if kind == "empty":
                if node.op in LAYERS and node.inputs[0] == t and int(node.attr("group", 1)) == 1:
                    if _only_group(cg, node.outputs[0], gid) or not _const_inputs(cg, node, t):
                        return (), ()
                    todo.append((node.outputs[0], "const"))
                elif (
                    (node.op in CHANNELWISE or node.op in LAYERS)
                    and node.inputs[0] == t
                    and (_only_group(cg, node.outputs[0], gid) and _const_inputs(cg, node, t))
                ):
                    todo.append((node.outputs[0], "empty"))  # per channel, a depthwise conv too
                else:
                    return (), ()
            elif node.op in CHANNELWISE and node.inputs[0] == t and _const_inputs(cg, node, t):
                todo.append((node.outputs[0], "const"))
            elif node.op in ("Add", "Sum") and any(
                i != t and not _const_inputs(cg, node, i) for i in node.inputs
            ):
                exits.add(t)  # the residual merge: the branch becomes an offset of the other input
            else:
                return (), ()
    if not const:
        return (), ()
    gone = empty | const
    nodes = tuple(sorted(n.name for n in graph.nodes if n.outputs and all(o in gone for o in n.outputs if o)))
    return nodes, tuple(sorted(exits))
