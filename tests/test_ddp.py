"""--nproc-per-trial: data-parallel training over torch.distributed (gloo on CPU). Two processes train the same
supernet and the same fine-tuned candidate as one process at the same global batch (the oracle: the one-process
run), up to float summation order."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from onnxconet.errors import OnnxconetError
from onnxconet.prepare import prepare
from onnxconet.search.base import Objective
from onnxconet.search.cost import CostModel
from onnxconet.search.dmasking import DMaskingConfig, DMaskingStrategy
from onnxconet.search.dmasking import strategy as dm_strategy
from onnxconet.space import WidthSpace
from onnxconet.train import ddp
from onnxconet.train.loop import TrainConfig
from tests.conftest import TINY, search_cfg

# float32 sums in another order (two shards all-reduced vs one batch; E[x^2]-E[x]^2 vs torch's BatchNorm
# kernel), compounded over the steps: measured ~1e-6 relative after 6 steps
TOL = 1e-4
# the logits step is Adam: it divides each gradient by its running RMS, so where a logit's gradient is near zero
# a summation-order difference is amplified into a visible step (CI: 0.03663 vs 0.03666, 4e-4 of how far the
# logits moved, the other entries within 1e-6). A wrong reduction moves them by the order of the movement itself.
LOGITS_TOL = 1e-2


def _fails(r: ddp.Rank) -> None:
    if r.rank == 1:
        raise ValueError("rank one cannot go on")
    torch.distributed.barrier()  # fails too, once rank 1 is gone: the knock-on, not the cause to report


def test_a_failing_rank_is_one_line_naming_it():
    with pytest.raises(OnnxconetError, match=r"rank 1 of 2: .*ValueError: rank one cannot go on"):
        ddp.launch(_fails, 2, threads=1)


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 1, (n, 3, 16, 16)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, n))
    return torch.utils.data.TensorDataset(x, y)


def _context(prep, out, nproc):
    loader = torch.utils.data.DataLoader(_data(), batch_size=32, shuffle=True)
    return SimpleNamespace(
        cfg=SimpleNamespace(resume=False, seed=0, device="cpu", probes=4, latency_seconds=0.2, nproc_per_trial=nproc,
                            torch_threads=1),
        out=out, cg=prep.graph, loaders=SimpleNamespace(train=loader), train=TrainConfig(batch_size=32),
        teacher=prep.loaded.module.eval(), judge=None, budget=SimpleNamespace(on="flops"), resolutions=None,
        stage=lambda text: None, prep=prep,
    )  # fmt: skip


def _supernet(prep, out, nproc, monkeypatch):
    """dmasking's phase 1 on `nproc` processes: (final logits per group, the supernet's outputs on fixed inputs)."""
    got = {}
    real = dm_strategy.train_supernet

    def keep(ctx, job):
        got["result"] = real(ctx, job)
        return got["result"]

    monkeypatch.setattr(dm_strategy, "train_supernet", keep)
    cg = prep.graph
    space = WidthSpace(cg, min_ratio=0.25)
    config = DMaskingConfig(epochs=2, options=4, align=1, warmup=0.0)
    s = DMaskingStrategy(space, Objective(0.5), CostModel(cg, space, "flops"), config, seed=1)
    out.mkdir()
    s.prepare(_context(prep, out, nproc), [])
    result = got["result"]
    x = _data(8, seed=1).tensors[0]
    with torch.no_grad():
        logits = result.model.eval()(x)
    return result.logits, logits, result.history


def test_two_processes_train_the_supernet_one_process_trains(tmp_path, monkeypatch):
    prep = prepare(TINY)
    logits1, out1, hist1 = _supernet(prep, tmp_path / "one", 1, monkeypatch)
    logits2, out2, hist2 = _supernet(prep, tmp_path / "two", 2, monkeypatch)
    assert logits1.keys() == logits2.keys()
    moved = max(float(np.abs(v).max()) for v in logits1.values())
    assert moved > 1e-3  # the logits were trained (not a comparison of two untouched initial states)
    for g in logits1:
        np.testing.assert_allclose(logits2[g], logits1[g], rtol=0, atol=LOGITS_TOL * moved)
    scale = float(out1.abs().max())
    assert float((out2 - out1).abs().max()) <= TOL * scale, float((out2 - out1).abs().max()) / scale
    # the epoch losses reported are the global batches' (the mean over the shards)
    for a, b in zip(hist1[1:], hist2[1:], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_sharded_batches_are_the_global_batches():
    loader = torch.utils.data.DataLoader(_data(40), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    whole = [b for b, _ in loader]
    loader.generator.manual_seed(3)
    shards = []
    for rank in range(2):
        loader.generator.manual_seed(3)
        r = ddp.Rank(rank, 2, torch.device("cpu"))
        shards.append([b for b, _ in ddp.shard_loader(loader, r)])
    for i, batch in enumerate(whole):
        assert torch.equal(batch[0::2], shards[0][i]) and torch.equal(batch[1::2], shards[1][i])


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path, npz_data):
    cfg = search_cfg(tmp_path, npz_data, nproc_per_trial=3)  # batch 32
    with pytest.raises(OnnxconetError, match="--batch-size 32 .* divisible by 3"):
        cfg.check()
    cfg = replace(cfg, batch_size=33, nproc_per_trial=3)
    cfg.check()
    cfg = replace(cfg, strategy="dmasking", resolutions=[12, 16])
    with pytest.raises(OnnxconetError, match="--nproc-per-trial .* --resolutions"):
        cfg.check()


@pytest.mark.slow  # 14 s; the supernet's equivalence (above) runs the same machinery in the default suite
def test_two_processes_fine_tune_the_candidate_one_process_fine_tunes():
    """A trial's fine-tune (`Ranks.fit`, a candidate cut from the model, distilled from the teacher) on 2 processes
    = `fit` on one, batch for batch."""
    from onnxconet.search.ranks import Ranks
    from onnxconet.surgery.inherit import WeightBank
    from onnxconet.train.loop import fit

    prep = prepare(TINY)
    cg, teacher = prep.graph, prep.loaded.module.eval()
    bank = WeightBank(teacher)
    widths = {g: max(1, w // 2) for g, w in cg.full_widths().items()}
    keep = cg.keep_mask(widths, bank.scores(cg))
    slices = cg.param_slices(keep)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    loader = torch.utils.data.DataLoader(_data(), batch_size=32, shuffle=True, generator=torch.Generator())
    outs = []
    for nproc in (1, 2):
        model = bank.cut(slices)
        loader.generator.manual_seed(5)
        if nproc == 1:
            fit(model, loader, cfg, teacher=teacher, device="cpu")
        else:
            Ranks(2, prep.loaded, threads=1).fit(model, slices, loader, cfg, teacher, "cpu")
        with torch.no_grad():
            outs.append(model.eval()(_data(8, seed=1).tensors[0]))
    before = bank.cut(slices).eval()(_data(8, seed=1).tensors[0]).detach()
    scale = float(outs[0].abs().max())
    assert float((outs[0] - before).abs().max()) > 1e-2 * scale  # training moved the outputs
    assert float((outs[1] - outs[0]).abs().max()) <= TOL * scale


@pytest.mark.slow
def test_a_search_on_two_processes_per_trial_finds_what_one_process_finds(tmp_path, npz_data):
    """`--nproc-per-trial 2` end to end (anneal: its per-epoch layer metric; the final fine-tune): the same trials,
    widths and accuracies as the one-process search (accuracies are counts of argmaxes: float-order differences
    do not move them here)."""
    from onnxconet.commands.search import run_search

    results = []
    for n in (1, 2):
        cfg = search_cfg(tmp_path / str(n), npz_data, trials=3, nproc_per_trial=n, pretrain_epochs=1)
        results.append(run_search(cfg).to_json())
    one, two = results
    assert two["config"]["nproc_per_trial"] == 2 and "nproc_per_trial" not in one["config"]
    assert [(t["widths"], t["accuracy"]) for t in two["trials"]] == [
        (t["widths"], t["accuracy"]) for t in one["trials"]
    ]
    assert two["best"]["accuracy"] == pytest.approx(one["best"]["accuracy"], abs=1e-9)
