"""Weight inheritance: the bank gives candidates its best channels and takes their fine-tuned weights back."""

import numpy as np
import torch

from onnxconet.prepare import prepare
from onnxconet.surgery.inherit import WeightBank
from tests.conftest import TINY


def test_cut_absorb_grow_roundtrip():
    prep = prepare(TINY)
    cg, module = prep.graph, prep.loaded.module
    bank = WeightBank(module)
    x = torch.randn(2, 3, 16, 16)
    full = bank.cut(cg.param_slices(cg.keep_mask(cg.full_widths())))
    torch.testing.assert_close(full(x), module.eval()(x), rtol=0, atol=0)

    gid = max(cg.prunable, key=lambda g: g.channels).id
    keep = cg.keep_mask({gid: 4}, bank.scores(cg))
    slices = cg.param_slices(keep)
    small = bank.cut(slices)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)  # "fine-tuning"
    bank.absorb(slices, small)
    # the same cut now returns the fine-tuned weights
    again = bank.cut(slices)
    for (k, a), b in zip(small.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # growing back: the channels that were cut keep the original's weights, the kept ones the new ones
    grown = bank.module().state_dict()
    orig = module.state_dict()
    for (param, axis), m in cg.members.items():
        if m.role != "producer":
            continue
        kept = keep[cg.bundle_of_id[m.ids]]
        if kept.all():
            continue
        w_new, w_old = grown[param].numpy(), orig[param].numpy()
        np.testing.assert_array_equal(
            np.compress(~kept, w_new, axis=axis), np.compress(~kept, w_old, axis=axis)
        )
        assert not np.array_equal(np.compress(kept, w_new, axis=axis), np.compress(kept, w_old, axis=axis))
