"""The inspect JSON is enough to slice the weights by hand: an independent slicer that reads only the JSON
must produce exactly the state_dict that onnxconet's own surgery produces."""

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from onnxconet.cli import app
from onnxconet.prepare import prepare
from onnxconet.surgery.torch import slice_torch

SPEC = str(Path(__file__).parent / "data" / "tiny_models.py") + ":mix"


def positions(member: dict, channel: int, divisor: int) -> list[int]:
    """Positions on the member's axis owned by group channel `channel`, per the documented JSON contract."""
    idx = member.get("indices")
    stride = member.get("stride", 1)
    if member.get("per_block"):
        block = channel // divisor
        return [idx[block] if idx is not None else block] if channel % divisor == 0 else []
    if idx is not None and len(idx) and isinstance(idx[0], list):  # irregular: positions per block
        return idx[channel // divisor] if channel % divisor == 0 else []
    i = idx[channel] if idx is not None else channel
    return list(range(i * stride, (i + 1) * stride))


def test_json_contract_reproduces_surgery():
    r = CliRunner().invoke(app, ["inspect", SPEC, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    prep = prepare(SPEC)
    cg, module = prep.graph, prep.loaded.module
    state = {k: v.clone() for k, v in module.state_dict().items()}

    # keep the even-numbered blocks of tied channels in every prunable group
    kept_channels = {}
    for g in rep["groups"]:
        if g["prunable"]:
            d = g["divisor"]
            kept_channels[g["id"]] = [c for c in range(g["channels"]) if (c // d) % 2 == 0]
    assert any(g["divisor"] > 1 for g in rep["groups"] if g["prunable"]), (
        "the grouped conv should give a divisor"
    )
    assert any("stride" in m for g in rep["groups"] for m in g["members"]), "flatten should give a stride"

    # hand slicing from the JSON alone
    keep_pos: dict[tuple[str, int], set] = {}
    for g in rep["groups"]:
        if g["id"] not in kept_channels:
            continue
        for m in g["members"]:
            key = (f"{m['module']}.{m['param']}", m["axis"])
            size = state[key[0]].shape[m["axis"]]
            drop = set()
            for c in range(g["channels"]):
                if c not in kept_channels[g["id"]]:
                    drop.update(positions(m, c, g["divisor"]))
            keep_pos.setdefault(key, set(range(size)))
            keep_pos[key] -= drop
    by_hand = dict(state)
    for (name, axis), keep in keep_pos.items():
        by_hand[name] = by_hand[name].index_select(axis, torch.tensor(sorted(keep)))

    # onnxconet's surgery with the same choice of tied blocks
    keep = np.ones(len(cg.group_of_bundle), dtype=bool)
    for gid, chans in kept_channels.items():
        g = cg.groups[gid]
        kept_blocks = {c // g.divisor for c in chans}
        for b, bundle in enumerate(g.bundles):
            keep[bundle] = b in kept_blocks
    ours = slice_torch(module, cg.param_slices(keep)).state_dict()
    assert set(ours) == set(by_hand)
    for k in ours:
        assert torch.equal(ours[k], by_hand[k]), k
    y = slice_torch(module, cg.param_slices(keep))(torch.randn(*prep.loaded.input_shape))
    assert y.shape == (1, 5)
