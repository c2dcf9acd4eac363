"""Channel groups: the units whose width the search chooses.

After the analysis pass, every union-find set of channel ids is a *bundle*: channel slots that are kept or
removed together (a residual stage ties the same channel of every block). A *group* is a set of bundles
linked by their producers (all output channels of one conv belong to one group); its width is the number of
bundles kept. Inside a group, bundles are ordered by their first producer's channel order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from onnxconet.errors import SurgeryError
from onnxconet.graph.analysis import Analyzer, Member
from onnxconet.graph.branches import removable_groups
from onnxconet.graph.chanmap import ChanMap
from onnxconet.graph.ir import Graph

log = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """One group: `channels` bundles; frozen groups carry the reason."""

    id: int
    bundles: np.ndarray  # global bundle indices, in channel order
    prunable: bool
    reason: str = ""
    divisor: int = 1  # channels per bundle: widths are multiples of it (grouped convs, channel shuffles)
    modules: list[str] = field(default_factory=list)  # producer modules, for display

    @property
    def channels(self) -> int:
        return len(self.bundles) * self.divisor

    @property
    def fixed_io(self) -> bool:
        """Frozen because it is the graph's input or output (image channels, logits)."""
        return self.reason.startswith(("graph input", "graph output"))


def split_param_name(name: str) -> tuple[str, str]:
    """'layer1.0.conv1.weight' -> ('layer1.0.conv1', 'weight'): ONNX initializer names are state_dict keys."""
    mod, _, param = name.rpartition(".")
    return mod, param


class ChannelGraph:
    """Channel groups of an ONNX model plus everything needed to slice it (see `surgery`)."""

    def __init__(self, model: onnx.ModelProto, source: str = "<model>") -> None:
        t0 = time.perf_counter()
        self.model = model
        self.source = source
        self.graph = Graph.from_model(model, source)
        an = Analyzer(self.graph)
        an.run()
        self.maps: dict[str, ChanMap] = an.maps
        self.seqs = an.seqs
        self.members: dict[tuple[str, int], Member] = an.members
        self._group(an)
        self.build_seconds = time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------- grouping
    def _group(self, an: Analyzer) -> None:
        n = len(an.uf)
        roots = an.uf.roots() if n else np.zeros(0, dtype=np.int64)
        _, self.bundle_of_id = np.unique(roots, return_inverse=True)
        self.bundle_of_id = self.bundle_of_id.astype(np.int64)
        nb = int(self.bundle_of_id.max()) + 1 if n else 0
        # link every channel's bundle to its source's first channel's bundle
        first = np.zeros(n, dtype=np.int64)
        for s in an.sources:
            first[s.start : s.start + s.size] = s.start
        a, b = self.bundle_of_id, self.bundle_of_id[first]
        adj = coo_matrix((np.ones(n, dtype=np.int8), (a, b)), shape=(nb, nb))
        _, comp = connected_components(adj, directed=False)
        # number groups by their first bundle
        order = {}
        for c in comp.tolist():
            order.setdefault(c, len(order))
        self.group_of_bundle = np.array([order[c] for c in comp.tolist()], dtype=np.int64)
        ng = len(order)
        reasons: dict[int, str] = {}
        for ids, why in an.frozen:
            if len(ids):
                for gid in np.unique(self.group_of_bundle[self.bundle_of_id[ids]]).tolist():
                    reasons.setdefault(gid, why)
        members_of = [np.nonzero(self.group_of_bundle == g)[0] for g in range(ng)] if ng < 2000 else None
        if members_of is None:
            idx = np.argsort(self.group_of_bundle, kind="stable")
            splits = np.searchsorted(self.group_of_bundle[idx], np.arange(ng + 1))
            members_of = [idx[splits[g] : splits[g + 1]] for g in range(ng)]
        self.groups: list[ChannelGroup] = []
        self.chan_of_bundle = np.zeros(nb, dtype=np.int64)
        for g in range(ng):
            bundles = members_of[g]
            self.chan_of_bundle[bundles] = np.arange(len(bundles))
            self.groups.append(ChannelGroup(g, bundles, g not in reasons, reasons.get(g, "")))
        widest: dict[int, int] = {}
        for m in self.members.values():
            if m.role != "producer":
                continue
            bundles = self.bundle_of_id[m.ids]
            gids = self.group_of_bundle[bundles]
            for gid in np.unique(gids).tolist():
                g = self.groups[gid]
                mod = split_param_name(m.param)[0]
                if mod not in g.modules:
                    g.modules.append(mod)
                # divisor: how many channels of the widest producer one bundle holds (uniform, else 1)
                counts = np.bincount(self.chan_of_bundle[bundles[gids == gid]], minlength=len(g.bundles))
                if counts.sum() > widest.get(gid, 0):
                    widest[gid] = int(counts.sum())
                    g.divisor = int(counts[0]) if (counts == counts[0]).all() and counts[0] > 0 else 1
        for g in self.groups:
            if g.prunable and len(g.bundles) == 1:
                g.prunable = False
                g.reason = (
                    f"ties (channel shuffle, chunk, grouped conv) leave one block of {g.channels} channels; "
                    "it can only be kept whole"
                )

    # ----------------------------------------------------------------------------------------- queries
    @functools.cached_property
    def removable(self) -> dict[int, tuple[str, ...]]:
        """Groups that may take width 0 (their residual branch is removed: `graph.branches`), with the names of
        the nodes removed with each."""
        return removable_groups(self)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def full_widths(self) -> dict[int, int]:
        """Width of every prunable group at full size."""
        return {g.id: g.channels for g in self.prunable}

    def group_members(self, gid: int) -> list[tuple[Member, np.ndarray, np.ndarray]]:
        """(member, positions on its axis, group channel of each position) for the members touching `gid`."""
        out = []
        for m in self.members.values():
            bundles = self.bundle_of_id[m.ids]
            pos = np.nonzero(self.group_of_bundle[bundles] == gid)[0]
            if len(pos):
                out.append((m, pos, self.chan_of_bundle[bundles[pos]]))
        return out

    def fingerprint(self) -> str:
        """A short hash of the group structure: widths files are only valid for the same fingerprint."""
        h = hashlib.sha256()
        for g in self.groups:
            h.update(f"{g.id}:{g.channels}:{int(g.prunable)};".encode())
        for (p, ax), m in sorted(self.members.items()):
            h.update(f"{p}/{ax}/{len(m.ids)};".encode())
        return h.hexdigest()[:16]

    def total_channels(self) -> tuple[int, int]:
        """(channels, prunable channels) over all groups but the graph's input and output ones."""
        total = sum(g.channels for g in self.groups if not g.fixed_io)
        return total, sum(g.channels for g in self.prunable)

    # ----------------------------------------------------------------------------------------- scoring
    def initializer(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.graph.initializers[name])

    def l1_scores(self, weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Per-bundle L1 norm of the producer weights (summed over a bundle's producers)."""
        scores = np.zeros(len(self.group_of_bundle), dtype=np.float64)
        for m in self.members.values():
            if m.role != "producer":
                continue
            w = (
                np.asarray(weights[m.param])
                if weights is not None and m.param in weights
                else self.initializer(m.param)
            )
            l1 = np.abs(np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)).sum(axis=1)
            np.add.at(scores, self.bundle_of_id[m.ids], l1)
        return scores

    # ----------------------------------------------------------------------------------------- planning
    def keep_mask(self, widths: Mapping[int, int], scores: np.ndarray | None = None) -> np.ndarray:
        """Which bundles to keep so that every group in `widths` has that many channels (top by score)."""
        if scores is None:
            scores = self.l1_scores()
        keep = np.ones(len(self.group_of_bundle), dtype=bool)
        for gid, w in widths.items():
            gid = int(gid)
            if gid < 0 or gid >= len(self.groups):
                raise SurgeryError(
                    f"group {gid} does not exist (the model has groups 0..{len(self.groups) - 1})"
                )
            g = self.groups[gid]
            w = int(w)
            if w == g.channels:
                continue
            if not g.prunable:
                raise SurgeryError(f"group {gid} is frozen ({g.reason}); leave it at {g.channels} channels")
            if w == 0 and gid in self.removable:
                keep[g.bundles] = False  # the branch goes (graph.branches)
                continue
            if not 1 <= w <= g.channels or w % g.divisor:
                zero = " (or 0: its branch can be removed)" if gid in self.removable else ""
                raise SurgeryError(
                    f"group {gid}: width {w} must be a multiple of {g.divisor} in {g.divisor}..{g.channels}{zero}"
                )
            order = np.argsort(-scores[g.bundles], kind="stable")
            keep[g.bundles[order[w // g.divisor :]]] = False
        self._keep_one_per_producer(keep, scores)
        return keep

    def _keep_one_per_producer(self, keep: np.ndarray, scores: np.ndarray) -> None:
        """A producer must keep at least one output channel (irregular groups could remove all of one), unless
        its group is a removed branch."""
        emptied = self.emptied(keep)
        for m in self.members.values():
            if m.role == "producer":
                b = self.bundle_of_id[m.ids]
                if not keep[b].any() and not self.groups_of(m.ids) <= emptied:
                    keep[b[np.argmax(scores[b])]] = True

    def emptied(self, keep: np.ndarray) -> set[int]:
        """The removable groups `keep` removes whole (their branch goes). The branch analysis runs only when some
        group is empty: a plan without width 0 does not pay for it."""
        empty = [g.id for g in self.groups if g.prunable and not keep[g.bundles].any()]
        return {gid for gid in empty if gid in self.removable} if empty else set()

    def groups_of(self, ids: np.ndarray) -> set[int]:
        """The groups holding channel ids `ids` (a member's or a tensor's channel map)."""
        return set(np.unique(self.group_of_bundle[self.bundle_of_id[np.asarray(ids).ravel()]]).tolist())

    def param_slices(self, keep: np.ndarray) -> dict[str, list[tuple[int, np.ndarray]]]:
        """Per parameter, the (axis, kept positions) to apply; parameters left whole are absent."""
        out: dict[str, list[tuple[int, np.ndarray]]] = {}
        for (param, axis), m in self.members.items():
            k = keep[self.bundle_of_id[m.ids]]
            if not k.all():
                out.setdefault(param, []).append((axis, np.nonzero(k)[0]))
        return out

    def widths_of(self, keep: np.ndarray) -> dict[int, int]:
        return {g.id: int(keep[g.bundles].sum()) * g.divisor for g in self.prunable}

    def new_extent(self, cmap: ChanMap, keep: np.ndarray) -> list[int]:
        """Sizes of `cmap`'s axes after pruning (rectangular by construction)."""
        k = keep[self.bundle_of_id[cmap.ids]]
        sizes = []
        for ax in range(k.ndim):
            other = tuple(a for a in range(k.ndim) if a != ax)
            sizes.append(int(k.any(axis=other).sum()) if other else int(k.sum()))
        return sizes

    def uniform_widths(self, ratio: float) -> dict[int, int]:
        """Width round((1 - ratio) * C) (rounded to the group's divisor, at least one divisor) per prunable group."""
        if not 0 <= ratio < 1:
            raise SurgeryError(f"--ratio {ratio} is outside [0, 1); use e.g. 0.5 to remove half the channels")
        out = {}
        for g in self.prunable:
            bundles = max(1, int(round((1 - ratio) * g.channels / g.divisor)))
            out[g.id] = min(len(g.bundles), bundles) * g.divisor
        return out
