"""Channel maps: which channel slot each position of a tensor's channel axes holds.

Every output channel of a producer (Conv, Gemm, MatMul with a weight) gets a global integer id. A tensor that
carries channels has a `ChanMap`: the axes that carry them and an integer array of ids over those axes
(shape = the tensor's sizes on those axes). Most tensors carry one axis (NCHW axis 1); a channel shuffle's
`view(N, g, C/g, H, W)` carries two; a flatten before a Gemm carries one axis where each id repeats H*W times.

Ops that force two channel slots to be kept or removed together (a residual Add, a grouped conv's blocks)
`union` their ids in a union-find; after propagation each union-find set is a *bundle* (one prunable unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChanMap:
    """Channel ids over `axes` (ascending, non-negative) of a tensor; `ids.shape` = the sizes on those axes."""

    axes: tuple[int, ...]
    ids: np.ndarray

    def shifted(self, offset: int) -> ChanMap:
        return ChanMap(tuple(a + offset for a in self.axes), self.ids)

    @property
    def is_1d(self) -> bool:
        return len(self.axes) == 1

    def on_axis(self, axis: int) -> bool:
        return self.axes == (axis,)


class UnionFind:
    """Union-find over channel ids, growing as sources are created."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie a[i] with b[i] for every i (arrays of equal size)."""
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
            if x != y:
                rx, ry = self.find(x), self.find(y)
                if rx != ry:
                    if rx < ry:
                        self.parent[ry] = rx
                    else:
                        self.parent[rx] = ry

    def roots(self) -> np.ndarray:
        """Root of every id, fully compressed (vectorized pointer jumping)."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                return parent
            parent = nxt


def tie_rectangular(uf: UnionFind, ids: np.ndarray) -> None:
    """A multi-axis channel map must shrink to a sub-rectangle with the leading extents fixed.

    `view(N, g, C/g, ...)` is rebuilt from the pruned size with the same g, so every row must keep the same
    positions: tie ids[..., c] across all leading indices.
    """
    if ids.ndim < 2:
        return
    rows = ids.reshape(-1, ids.shape[-1])
    for r in range(1, rows.shape[0]):
        uf.union_arrays(rows[0], rows[r])


def reshape_map(cmap: ChanMap, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> ChanMap | None:
    """Channel map of a Reshape/Flatten/Squeeze/Unsqueeze output, or None when the axes do not factor.

    Input and output axes are matched in contiguous blocks of equal element count. Within a block holding
    channel axes, the ids are broadcast over the block, flattened in C order and reshaped to the output block;
    output axes along which the ids do not vary carry no channel.
    """
    blocks = _factor_blocks(in_shape, out_shape)
    if blocks is None:
        return None
    out_axes: list[int] = []
    out_ids: list[np.ndarray] = []
    for (i0, i1), (o0, o1) in blocks:
        in_ch = [a for a in cmap.axes if i0 <= a < i1]
        if not in_ch:
            continue
        # ids restricted to this block's channel axes, broadcast to the full block
        if len(in_ch) != len(cmap.axes):
            return None  # channel axes spread over several blocks: not representable, callers freeze
        full = _block_ids(cmap, in_ch, in_shape[i0:i1], i0)
        block = full.reshape(out_shape[o0:o1]) if o1 > o0 else full.reshape(())
        keep = [k for k in range(block.ndim) if not _constant_along(block, k)]
        if not keep:
            continue
        drop = tuple(k for k in range(block.ndim) if k not in keep)
        reduced = block[tuple(0 if k in drop else slice(None) for k in range(block.ndim))]
        out_axes.extend(o0 + k for k in keep)
        out_ids.append(reduced)
    if not out_axes:
        return None
    if len(out_ids) == 1:
        return ChanMap(tuple(out_axes), out_ids[0])
    # channel axes landing in several blocks: their ids are independent, combine as an outer product is
    # not representable; callers freeze such maps.
    return None


def _block_ids(cmap: ChanMap, in_ch: list[int], block_shape: tuple[int, ...], i0: int) -> np.ndarray:
    ids = cmap.ids
    shape = [1] * len(block_shape)
    for k, a in enumerate(in_ch):
        shape[a - i0] = ids.shape[k]
    return np.broadcast_to(ids.reshape(shape), block_shape)


def _constant_along(arr: np.ndarray, axis: int) -> bool:
    if arr.shape[axis] <= 1:
        return True
    first = np.take(arr, [0], axis=axis)
    return bool(np.all(arr == first))


def _factor_blocks(a: tuple[int, ...], b: tuple[int, ...]):
    """Pair up contiguous axis ranges of two shapes with equal products; size-1 axes join the current block."""
    if int(np.prod(a)) != int(np.prod(b)):
        return None
    blocks = []
    i = j = 0
    while i < len(a) or j < len(b):
        i0, j0 = i, j
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i += 1 if i < len(a) else 0
        j += 1 if j < len(b) else 0
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                pa *= a[i]
                i += 1
            else:
                if j >= len(b):
                    return None
                pb *= b[j]
                j += 1
        blocks.append(((i0, i), (j0, j)))
        if i0 == i and j0 == j:
            break
    return blocks
