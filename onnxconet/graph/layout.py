"""The groups of a model as plain data: enough for someone outside the project to slice the weights.

Each group lists its members: `module` (torch qualified name), `param` ("weight", "running_mean"...), the
sliced `axis`, the `role` (producer: its output channels are the group; consumer: its input channels are
the group; channelwise: BN, bias, depthwise filter, per-channel scale). `indices` lists, in group-channel
order, the positions on `axis` of the group's channels when they are not simply 0..C-1, and `stride` is the
number of consecutive elements each channel owns (H*W for a Gemm after a Flatten). Channels c with the same
c // divisor are tied (kept or removed together); a member holding one slot per tied block (a grouped conv's
input axis) has `"per_block": true` and one index per block. Irregular layouts give a list of positions per
channel block.
"""

from __future__ import annotations

import numpy as np

from onnxconet.graph.groups import ChannelGraph, split_param_name


def member_layout(positions: np.ndarray, chan: np.ndarray, n_bundles: int, divisor: int) -> dict:
    """JSON layout of one member: positions on its axis grouped by the group's bundles."""
    order = np.lexsort((positions, chan))
    pos, ch = positions[order], chan[order]
    counts = np.bincount(ch, minlength=n_bundles)
    out: dict = {}
    if not (counts == counts[0]).all() or counts[0] == 0:
        starts = np.concatenate([[0], np.cumsum(counts)])
        out["indices"] = [pos[starts[b] : starts[b + 1]].tolist() for b in range(n_bundles)]
        return out
    m = int(counts[0])
    if m == divisor:
        idx = pos
    elif m % divisor == 0:
        s = m // divisor
        runs = pos.reshape(-1, s)
        if not ((np.diff(runs, axis=1) == 1).all() and (runs[:, 0] % s == 0).all()):
            out["indices"] = pos.reshape(n_bundles, m).tolist()
            return out
        out["stride"] = s
        idx = runs[:, 0] // s
    elif m == 1:
        out["per_block"] = True
        idx = pos
    else:
        out["indices"] = pos.reshape(n_bundles, m).tolist()
        return out
    if not np.array_equal(idx, np.arange(len(idx))):
        out["indices"] = idx.tolist()
    return out


def groups_json(cg: ChannelGraph) -> list[dict]:
    out = []
    for g in cg.groups:
        members = []
        for m, pos, chan in cg.group_members(g.id):
            module, param = split_param_name(m.param)
            entry = {"module": module, "param": param, "axis": int(m.axis), "role": m.role}
            entry.update(member_layout(pos, chan, len(g.bundles), g.divisor))
            members.append(entry)
        out.append(
            {
                "id": g.id,
                "channels": g.channels,
                "prunable": g.prunable,
                "removable": g.id in cg.removable,  # width 0 allowed: its residual branch can go (--depth)
                "reason": g.reason or None,
                "divisor": g.divisor,
                "members": members,
            }
        )
    return out
