"""The analysis pass: walk the ONNX graph once in topological order, applying each op's rule.

The context (`Analyzer`) is what rules see: channel maps of tensors, new channel sources, ties (union-find),
parameter slices ("members") and frozen channels with their reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from onnxconet.errors import GraphError
from onnxconet.graph.chanmap import ChanMap, UnionFind
from onnxconet.graph.ir import Graph, Node
from onnxconet.graph.rules import RULES

log = logging.getLogger(__name__)

MAX_CHANNELS = 1 << 20  # channels of one tensor: far more than any CNN layer has
_ALIAS_OPS = ("Identity", "Cast", "CastLike")
_RESHAPE_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")


@dataclass
class Member:
    """A slice of one parameter: `ids[p]` is the channel slot held at position p of axis `axis`."""

    param: str
    axis: int
    ids: np.ndarray
    role: str  # producer | consumer | channelwise
    nodes: list[str] = field(default_factory=list)


@dataclass
class Source:
    """A block of channel ids created by one node (a producer, a graph input, an opaque op)."""

    start: int
    size: int
    node: str
    scope: str


class Analyzer:
    """Runs the rules over a graph and collects maps, ties, members and frozen channels."""

    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.uf = UnionFind()
        self.maps: dict[str, ChanMap] = {}
        self.seqs: dict[str, tuple] = {}
        self.members: dict[tuple[str, int], Member] = {}
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.sources: list[Source] = []

    # ----- what rules use
    def shape(self, name: str):
        return self.g.shape(name)

    def const(self, name: str):
        return self.g.const(name)

    def map(self, name: str) -> ChanMap | None:
        return self.maps.get(name)

    def set(self, name: str, cmap: ChanMap) -> None:
        self.maps[name] = cmap

    def new_source(self, node: Node | None, n: int, frozen: str | None = None, name: str = "") -> np.ndarray:
        if not 0 <= int(n) <= MAX_CHANNELS:  # every channel gets an id: a damaged dim would fill the memory
            what = node.describe() if node else f"graph input '{name}'"
            raise GraphError(
                f"{self.g.source}: {what} would have {int(n)} channels by the shapes the file declares (at most "
                f"{MAX_CHANNELS} are analysed); the file is damaged or declares a wrong shape, re-export the model"
            )
        ids = self.uf.add(int(n))
        self.sources.append(
            Source(
                int(ids[0]) if n else len(self.uf),
                int(n),
                node.name if node else name,
                node.scope if node else name,
            )
        )
        if frozen:
            self.freeze(ids, frozen)
        return ids

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        self.frozen.append((np.asarray(ids, dtype=np.int64).ravel(), reason))

    def unknown(self, node: Node, reason: str) -> None:
        """Freeze every channel that reaches `node`; its outputs become frozen, opaque channels."""
        why = f"{node.describe()}: {reason}; its channels are frozen"
        touched = False
        for i in node.inputs:
            m = self.maps.get(i)
            if m is not None:
                self.freeze(m.ids, why)
                touched = True
            seq = self.seqs.get(i)
            if seq is not None:
                touched = True
                for m in [seq[1]] if seq[0] == "same" else seq[1]:
                    self.freeze(m.ids, why)
        if not touched:
            return
        for o in node.outputs:
            s = self.shape(o)
            if o and s is not None and len(s) >= 2 and s[1]:
                self.set(o, ChanMap((1,), self.new_source(node, s[1], frozen=why)))

    def param_axis(self, name: str, axis: int) -> tuple[str, int] | None:
        """The initializer (and its axis) that tensor `name`'s `axis` reads, through casts/transposes/reshapes."""
        cur, ax = name, axis
        for _ in range(8):
            if cur in self.g.initializers:
                return cur, ax
            node = self.g.producer.get(cur)
            if node is None:
                return None
            if node.op in _ALIAS_OPS:
                cur = node.inputs[0]
            elif node.op == "Transpose":
                rank = len(self.shape(node.inputs[0]) or ())
                perm = list(node.attr("perm", list(range(rank))[::-1]))
                ax, cur = int(perm[ax]), node.inputs[0]
            elif node.op in _RESHAPE_OPS:
                ins, outs = self.shape(node.inputs[0]), self.shape(cur)
                if ins is None or outs is None or [d for d in ins if d != 1] != [d for d in outs if d != 1]:
                    return None
                if outs[ax] == 1:
                    return None
                k = sum(1 for d in outs[:ax] if d != 1)
                ax = [i for i, d in enumerate(ins) if d != 1][k]
                cur = node.inputs[0]
            else:
                return None
        return None

    def member(self, node: Node, tensor: str, axis: int, ids: np.ndarray, role: str) -> None:
        pa = self.param_axis(tensor, axis)
        if pa is None:
            self.freeze(
                ids, f"{node.describe()} has a per-channel operand '{tensor}' that is not a model parameter"
            )
            return
        old = self.members.get(pa)
        if old is None:
            self.members[pa] = Member(pa[0], pa[1], np.array(ids, dtype=np.int64), role, [node.name])
        elif len(old.ids) == len(ids):
            self.uf.union_arrays(old.ids, np.asarray(ids))  # one parameter axis serves both uses
            old.nodes.append(node.name)
        else:
            why = f"parameter '{pa[0]}' is used with different channel layouts by {old.nodes[0]} and {node.name}"
            self.freeze(old.ids, why)
            self.freeze(ids, why)

    def channelwise_operand(
        self, node: Node, name: str, cmap: ChanMap, expect_rank: int, optional: bool = False
    ) -> None:
        """`name` is an operand combined channel by channel with a tensor mapped by `cmap` (axes relative
        to `name`'s own rank). A model parameter becomes a channel-wise member; a constant is frozen."""
        if self.param_axis(name, 0) is None and self._derived_from_shape(name):
            return  # computed from a pruned tensor's shape (the exporter's zero conv bias): follows by itself
        s = self.shape(name)
        if s is None:
            return
        spans = [
            k for k, a in enumerate(cmap.axes) if 0 <= a < len(s) and s[a] == cmap.ids.shape[k] and s[a] > 1
        ]
        if not spans:
            return  # broadcast scalar or size-1 operand: nothing per channel
        if len(cmap.axes) != 1:
            self.freeze(
                cmap.ids, f"{node.describe()} combines a multi-axis channel map with operand '{name}'"
            )
            return
        a = cmap.axes[0]
        if self.param_axis(name, a) is not None:
            self.member(node, name, a, cmap.ids, "channelwise")
        else:
            self.freeze(
                cmap.ids,
                f"{node.describe()} has a per-channel constant '{name}' that is not a model parameter",
            )

    def _derived_from_shape(self, name: str, budget: int = 24) -> bool:
        """True when `name` is computed from some tensor's Shape (e.g. the exporter's zero conv bias): it
        follows the pruned shape by itself."""
        stack, seen = [name], set()
        while stack and budget > 0:
            cur = stack.pop()
            budget -= 1
            node = self.g.producer.get(cur)
            if node is None or cur in seen:
                continue
            seen.add(cur)
            if node.op in ("Shape", "Size"):
                return True
            stack.extend(i for i in node.inputs if i)
        return False

    # ----- the pass
    def run(self) -> None:
        g = self.g
        for name in g.inputs:
            s = g.shape(name)
            if s is not None and len(s) >= 2 and s[1]:
                self.set(
                    name,
                    ChanMap((1,), self.new_source(None, s[1], frozen=f"graph input '{name}'", name=name)),
                )
        for node in g.nodes:
            carries = any(i in self.maps or i in self.seqs for i in node.inputs if i)
            if not carries:
                continue
            fn = RULES.get(node.op) if node.domain in ("", "ai.onnx") else None
            if fn is None:
                self.unknown(
                    node, f"is an unsupported op ({node.domain + '.' if node.domain else ''}{node.op})"
                )
                continue
            try:
                fn(self, node)
            except Exception as e:  # noqa: BLE001 - a rule that cannot handle a node freezes, never crashes
                log.debug("rule %s failed on %s", node.op, node.name, exc_info=True)
                self.unknown(node, f"could not be analysed ({type(e).__name__}: {e})")
        for name in g.outputs:
            m = self.maps.get(name)
            if m is not None:
                self.freeze(m.ids, f"graph output '{name}'")
