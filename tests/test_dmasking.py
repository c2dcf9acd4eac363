"""dmasking (FBNetV2's DMaskingNAS): staircase masks, where they act, gradients to the logits, expected cost,
derived widths, a smoke run and resume after a kill."""

import copy
import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onnxconet.commands.search import run_search
from onnxconet.errors import OnnxconetError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.prepare import prepare
from onnxconet.search.base import Objective, Trial, TrialState
from onnxconet.search.cost import CostModel, scale_onto
from onnxconet.search.dmasking import CHECKPOINT, CHECKS, DMaskingConfig, DMaskingStrategy
from onnxconet.search.dmasking.derive import SPAN, Checks, judged
from onnxconet.search.dmasking.supernet import RankedBank, SupernetResult
from onnxconet.search.effective import EffectiveCost
from onnxconet.search.masks import Supernet, importance_ranks, staircase_matrix, width_options
from onnxconet.space import WidthSpace
from onnxconet.surgery.inherit import WeightBank
from onnxconet.surgery.torch import slice_torch, zero_pruned
from onnxconet.train.loop import TrainConfig
from tests.conftest import TINY, search_cfg
from tests.oracle import randomize_norms


class Grouped(nn.Module):
    """A grouped conv (divisor 2 on its input group) and a plain conv, no BN on the last producer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.c = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.c(self.b(self.a(x))))
        return self.head(x.mean((2, 3)))


def killed_at_trial(n: int):
    """A replacement for `Evaluator.run` that raises KeyboardInterrupt (a kill) when trial `n` starts."""
    from onnxconet.search.evaluate import Evaluator

    real_run = Evaluator.run

    def run(self, number, widths, epochs=None):
        if number == n:
            raise KeyboardInterrupt
        return real_run(self, number, widths, epochs)

    return run


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "grouped.py"
    src = Path(__file__).read_text()
    start = src.index("class Grouped")
    end = src.index("@pytest.fixture")
    path.write_text(
        "import torch\nfrom torch import nn\n\nINPUT_SHAPE = (1, 3, 16, 16)\n\n\n"
        + src[start:end]
        + "\ndef grouped():\n    return Grouped()\n"
    )
    return prepare(f"{path}:grouped")


# --------------------------------------------------------------------------------------- staircase
def test_staircase_hand_example():
    """8 bundles, options of 2, 4 and 8 bundles with weights .2 .3 .5: ranks 0-1 keep 1.0, ranks 2-3 keep .8
    (options 4 and 8), ranks 4-7 keep .5 (option 8 only)."""
    T = torch.from_numpy(staircase_matrix([2, 4, 8], 8))
    m = T @ torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(m, torch.tensor([1.0, 1.0, 0.8, 0.8, 0.5, 0.5, 0.5, 0.5]))
    # one-hot on an option = keep exactly that many bundles
    assert (T @ torch.tensor([0.0, 1.0, 0.0])).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_staircase_follows_importance(tiny):
    """The mask of a channel depends on its rank by score: the highest-scoring channel is masked last."""
    cg = tiny.graph
    space = WidthSpace(cg, min_ratio=0.25)
    options = width_options(cg, space, 4, align=1)
    scores = np.random.default_rng(1).random(len(cg.group_of_bundle))
    net = Supernet(tiny.loaded.module, cg, options, scores)
    gid = 2  # conv1's 12 channels: options 3, 6, 9, 12
    assert options[gid] == [3, 6, 9, 12]
    masks = net.channel_masks({g: torch.tensor([0.1, 0.2, 0.3, 0.4]) if g == gid else torch.eye(len(o))[-1]
                               for g, o in options.items()})  # fmt: skip
    m = masks["conv1.1"]  # the BN after conv1: the mask goes after the norm
    rank = importance_ranks(cg, scores)[
        cg.bundle_of_id[[s for s in net.sites if s.module == "conv1.1"][0].ids]
    ]
    expected = torch.tensor([1.0, 0.9, 0.7, 0.4])[torch.from_numpy(rank // 3)]
    assert torch.allclose(m, expected)
    assert m[int(np.argmin(rank))] == 1.0 and m[int(np.argmax(rank))] == pytest.approx(0.4)


@pytest.mark.parametrize("which", ["tiny", "grouped", "tiny+depth"])
def test_one_hot_masks_equal_pruning(which, tiny, grouped):
    """With one-hot weights the masked supernet computes exactly the pruned network (keep_mask, same scores):
    masks sit where the channel's value is final (after the BN, or on the producer when no BN follows). With
    --depth the residual branch's width 0 computes the network with the branch removed (its offset kept)."""
    prep = grouped if which == "grouped" else tiny
    cg = prep.graph
    model = randomize_norms(copy.deepcopy(prep.loaded.module))  # a removed branch's offset is not 0
    space = WidthSpace(cg, min_ratio=0.25, depth=which.endswith("depth"))
    options = width_options(cg, space, 6, align=1)
    if which.endswith("depth"):
        (branch,) = cg.removable
        gates = Supernet(model, cg, options, cg.l1_scores()).gates
        assert options[branch][0] == 0 and [g.gid for g in gates] == [branch]
        options[branch] = [0, options[branch][-1]]  # both widths drawn below, 0 among them
    scores = cg.l1_scores()
    net = Supernet(model, cg, options, scores)
    assert net.gids == sorted(options) and not net.skipped
    kinds = {s.module: s.kind for s in net.sites}
    assert all(k == "norm" for m, k in kinds.items() if m != "c")
    if which == "grouped":
        assert kinds.get("c") == "producer"
        assert any(cg.groups[g].divisor == 2 for g in net.gids)
    net.attach()
    rng = np.random.default_rng(0)
    x = torch.randn(4, *prep.loaded.input_shape[1:])
    with torch.no_grad():
        full = model(x)
        for _ in range(4):
            widths = {g: int(rng.choice(o)) for g, o in options.items()}
            net.set_weights(net.one_hot(widths))
            masked = model(x)
            net.set_weights(None)
            keep = cg.keep_mask(widths, scores)
            assert torch.allclose(masked, zero_pruned(model, cg, keep)(x), atol=1e-5)
            assert torch.allclose(masked, slice_torch(model, cg.param_slices(keep)).eval()(x), atol=1e-5)
        assert torch.equal(model(x), full)  # no weights set: the plain model
    net.detach()
    with torch.no_grad():
        net.set_weights(net.one_hot({g: o[0] for g, o in options.items()}))
        assert torch.equal(model(x), full)  # hooks removed
        net.set_weights(None)


def test_gradients_reach_logits(tiny):
    """The task loss and the cost term both give every group's logits a gradient (train-mode BN included)."""
    cg = tiny.graph
    space = WidthSpace(cg, min_ratio=0.25)
    model = tiny.loaded.module.train()
    options = width_options(cg, space, 4, align=1)
    net = Supernet(model, cg, options, cg.l1_scores())
    net.attach()
    torch.manual_seed(0)
    net.set_weights(net.sample(2.0))
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 5, (8,)))
    loss.backward()
    for gid in net.gids:
        g = net.logits[str(gid)].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, gid
    net.zero_grad()
    cost = EffectiveCost(cg, "flops").expected_ratio(net.probs(2.0), net.options)
    cost.backward()
    for gid in net.gids:
        assert net.logits[str(gid)].grad.abs().sum() > 0, gid
    net.detach()


def test_width_zero_fades_the_branch_when_weights_are_soft(tiny):
    """Soft weights: the branch's exit into the residual Add (the BatchNorm after conv2) is its own output
    times 1 - w_0, so the task loss reaches option 0's logit; a train-mode BatchNorm would otherwise normalize
    the zeroed share away. One-hot weights at 0 are not faded: the zero staircase removes the branch exactly."""
    cg = tiny.graph
    model = randomize_norms(copy.deepcopy(tiny.loaded.module)).train()  # the BN's shift: not 0
    options = width_options(cg, WidthSpace(cg, min_ratio=0.25, depth=True), 4, align=1)
    (branch,) = cg.removable
    net = Supernet(model, cg, options, cg.l1_scores())
    (gate,) = net.gates
    exit_module = model.get_submodule(gate.module)
    seen = {}

    def record(mod, inp, out):  # registered before the supernet's hooks: `out` is the module's own output
        seen["own"] = type(mod).forward(mod, inp[0]).detach()

    handle = exit_module.register_forward_hook(record)
    net.attach()
    exit_module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("faded", out))
    x = torch.randn(8, 3, 16, 16)
    full = {g: torch.eye(len(o))[-1] for g, o in options.items()}  # the other groups at full width
    for w0 in (0.0, 0.3, 0.9):
        logits = torch.log(torch.tensor([w0, 1 - w0]).clamp_min(1e-12)).requires_grad_()
        w = torch.zeros(len(options[branch]))
        w = w.index_put((torch.tensor([0, len(w) - 1]),), torch.softmax(logits, 0))
        net.set_weights(full | {branch: w})
        loss = model(x).square().mean()
        torch.testing.assert_close(seen["faded"].detach(), (1 - w0) * seen["own"], rtol=1e-5, atol=1e-6)
        loss.backward()
        assert logits.grad.abs().sum() > 0
    with torch.no_grad():  # the real sub-network at 0: not faded, the exit is the BN of conv2's zero output
        net.set_weights(full | {branch: torch.eye(len(options[branch]))[0]})
        model(x)
        torch.testing.assert_close(seen["faded"], seen["own"])
        shift = exit_module.bias.detach().view(1, -1, 1, 1)
        assert shift.abs().min() > 0
        torch.testing.assert_close(seen["own"], shift.expand_as(seen["own"]))
    handle.remove()
    net.detach()


def test_options_without_a_gate_drop_width_zero(tiny):
    """A group offered 0 whose branch exit no torch module stands for keeps its branch (the Supernet refuses it),
    with the reason: here the exit BatchNorm is renamed, so the export's module "conv2.1" is not in the model."""
    from onnxconet.search.masks import depth_options

    cg = tiny.graph
    options = width_options(cg, WidthSpace(cg, min_ratio=0.25, depth=True), 4, align=1)
    (branch,) = cg.removable
    model = copy.deepcopy(tiny.loaded.module).eval()
    kept, why = depth_options(cg, model, options)
    assert kept == options and why == {}
    model.conv2[1] = nn.Sequential(model.conv2[1], nn.Upsample(scale_factor=1))  # same shape: still fine
    assert depth_options(cg, model, options)[1] == {}
    model.conv2 = nn.Sequential(OrderedDict(conv=model.conv2[0], norm=model.conv2[1]))  # no module "conv2.1"
    kept, why = depth_options(cg, model, options)
    assert kept[branch] == options[branch][1:] and "exit" in why[branch]
    with pytest.raises(ValueError, match=f"group {branch} is offered width 0"):
        Supernet(model, cg, options, cg.l1_scores())


# --------------------------------------------------------------------------------------- expected cost
@pytest.mark.parametrize("on", ["flops", "params"])
def test_effective_cost_exact(grouped, on):
    """One-hot distributions give exactly count_flops / count_params; a distribution gives the expectation."""
    cg = grouped.graph
    space = WidthSpace(cg, min_ratio=0.25)
    ec = EffectiveCost(cg, on)
    count = count_flops if on == "flops" else count_params
    assert ec.base == pytest.approx(count(cg))
    options = {g.id: g.options() for g in space}
    rng = np.random.default_rng(0)
    for _ in range(5):
        widths = space.sample(rng)
        exact = count(cg, cg.keep_mask(widths)) / count(cg)
        probs = {g: torch.eye(len(o), dtype=torch.float64)[o.index(widths[g])] for g, o in options.items()}
        assert float(ec.expected_ratio(probs, options)) == pytest.approx(exact, rel=1e-9)
    probs = {g: torch.softmax(torch.randn(len(o), dtype=torch.float64), 0) for g, o in options.items()}
    e = float(ec.expected_ratio(probs, options))
    draws = [
        ec.ratio({g: int(rng.choice(o, p=probs[g].numpy())) for g, o in options.items()}) for _ in range(3000)
    ]
    assert e == pytest.approx(np.mean(draws), rel=0.02)


# --------------------------------------------------------------------------------------- derivation
def test_derived_widths_respect_divisors_and_budget(grouped):
    """Argmax, expected and sampled derivations land on allowed widths (multiples of the divisor, in the
    space) under the budget as predicted; replaying with the same seed gives the same widths."""
    cg = grouped.graph
    space = WidthSpace(cg, min_ratio=0.25)
    cost = CostModel(cg, space, "flops")

    def make():
        s = DMaskingStrategy(space, Objective(0.4), cost, DMaskingConfig(options=4, align=1), seed=5)
        rng = np.random.default_rng(3)
        s.derive_from(SupernetResult({g: rng.normal(0, 2, len(o)) for g, o in s.options.items()}, 1.0))
        return s

    runs = []
    for _ in range(2):
        s = make()
        asked = []
        for n in range(5):
            w = s.ask()
            asked.append(w)
            for gid, width in w.items():
                assert width % cg.groups[gid].divisor == 0
            assert space.contains(w), w
            ratio = s.dm_cost.effective.ratio(w)
            assert ratio <= 0.4 + 1e-9
            assert ratio > 0.25  # put onto the budget, not far below it
            facts = s.tell(Trial(n, w, TrialState.COMPLETE, accuracy=0.5, ratio=ratio))
            assert facts["derived"] == ["argmax", "expected", "sample", "sample", "sample"][n]
        runs.append(asked)
    assert runs[0] == runs[1]
    assert any(cg.groups[g].divisor == 2 for g in runs[0][0])


def test_options_follow_the_runs_align_unless_set():
    """Unset, dmasking's options are the run's widths (`WidthSpace` at --align 4: ResNet-20's 32-channel groups
    reach 4); `align=8` still restricts groups of >= 32 channels to multiples of 8 (the old default, which
    ignored --align)."""
    cg = prepare("models/fashion_mnist.py:resnet20").graph
    space = WidthSpace(cg, align=4)
    cost = CostModel(cg, space, "flops")
    own = DMaskingStrategy(space, Objective(0.5), cost, DMaskingConfig(options=16))
    eight = DMaskingStrategy(space, Objective(0.5), cost, DMaskingConfig(options=16, align=8))
    for gid, opts in own.options.items():
        gs = space.groups[gid]
        assert opts == gs.options() and own.grid[gid] == gs.options()  # every width of the run, no more
        if gs.hi >= 32:
            assert all(w % 8 == 0 for w in eight.options[gid]) and min(eight.options[gid]) == 8
            assert any(w % 8 for w in opts) and min(opts) == gs.lo == gs.hi // 8  # 12, 20, ...; 4 or 8
    assert sorted({space.groups[g].hi for g in own.options}) == [16, 32, 64]
    assert all(min(own.options[g]) == 4 for g in own.options if space.groups[g].hi == 32)


def test_derivation_stops_when_the_budget_leaves_nothing_new(grouped):
    """Every handed-out configuration is new; when the budget fits only the narrowest widths, the second ask
    is None (the run stops there) and the summary says after how many."""
    cg = grouped.graph
    space = WidthSpace(cg, min_ratio=0.25)
    cost = CostModel(cg, space, "flops")
    floor = EffectiveCost(cg, "flops").ratio(space.smallest())

    def strategy(budget):
        s = DMaskingStrategy(space, Objective(budget), cost, DMaskingConfig(options=4, align=1), seed=1)
        rng = np.random.default_rng(0)
        s.derive_from(SupernetResult({g: rng.normal(0, 1, len(o)) for g, o in s.options.items()}, 1.0))
        s.supernet_summary = {}
        s.supernet.history = [{}]
        return s

    tight = strategy(floor * 1.001)
    assert tight.ask() == space.smallest()
    assert tight.ask() is None and tight.summary()["dmasking"]["exhausted_after"] == 1
    roomy = strategy(0.6)
    asked = [roomy.ask() for _ in range(6)]
    assert None not in asked and len({tuple(sorted(w.items())) for w in asked}) == 6
    assert "exhausted_after" not in roomy.supernet_summary


def test_put_on_budget_scales_both_ways():
    """The derivation's fit to the budget (`scale_onto` over dmasking's span) scales down and up."""
    one = lambda w: int(min(64, max(8, round(w / 8) * 8)))  # noqa: E731
    snap = lambda ws: {g: one(w) for g, w in ws.items()}  # noqa: E731
    predict = lambda w: sum(v * v for v in w.values()) / (2 * 64 * 64)  # noqa: E731
    for start in ({0: 64, 1: 64}, {0: 8, 1: 16}):
        w, _ = scale_onto(start, 0.5, predict, snap, span=SPAN)
        assert predict(w) <= 0.5
        assert predict({g: one(v + 8) for g, v in w.items()}) > 0.5


def test_config_rejects_unknown_options():
    with pytest.raises(OnnxconetError, match="unknown dmasking option"):
        DMaskingConfig.from_dict({"epocs": 3})
    with pytest.raises(OnnxconetError, match="loss"):
        DMaskingConfig.from_dict({"loss": "mse"})


# --------------------------------------------------------------------------------------- prepare
def run_context(prep, out, on="flops", resume=False, resolutions=None):
    """A `RunContext` stand-in with what `DMaskingStrategy.prepare` reads (no run: no judge, no evaluator)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 1, (96, 3, 16, 16)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, 96))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    return SimpleNamespace(
        cfg=SimpleNamespace(resume=resume, seed=0, device="cpu", probes=4, latency_seconds=0.2, nproc_per_trial=1),
        out=Path(out), cg=prep.graph, loaders=SimpleNamespace(train=loader), train=TrainConfig(batch_size=32),
        teacher=prep.loaded.module.eval(), judge=None, budget=SimpleNamespace(on=on), resolutions=resolutions,
        stage=lambda text: None,
    )  # fmt: skip


def test_prepare_trains_resumes_and_derives(tmp_path, monkeypatch):
    """`prepare` trains the supernet (one history entry per epoch, a checkpoint) and returns the bank the trials
    are cut from, in the original's L1 order; ask() never trains. A resumed prepare trains no step and gives the
    same supernet, bank and derived widths."""
    from onnxconet.search.dmasking import supernet as dm

    prep = prepare(TINY)
    cg = prep.graph
    space = WidthSpace(cg, min_ratio=0.25)
    config = DMaskingConfig(epochs=2, options=4, align=1)

    def make():
        return DMaskingStrategy(space, Objective(0.5), CostModel(cg, space, "flops"), config, seed=1)

    s = make()
    with pytest.raises(OnnxconetError, match="prepare"):
        s.ask()
    assert s.summary() == {}
    setup = s.prepare(run_context(prep, tmp_path), [])
    assert isinstance(setup.bank, RankedBank) and setup.resolution is None
    assert np.array_equal(setup.bank.scores(cg), WeightBank(prep.loaded.module).scores(cg))
    summary = s.summary()
    assert [h["epoch"] for h in summary["logits_history"]] == [0, 1, 2] and summary["dmasking"]["epochs"] == 2
    assert (tmp_path / CHECKPOINT).is_file()
    widths = [s.ask() for _ in range(3)]
    facts = s.tell(Trial(0, widths[0], TrialState.COMPLETE, accuracy=0.5, ratio=0.4))
    assert facts["supernet"] is summary["dmasking"] and facts["logits_history"] == summary["logits_history"]

    monkeypatch.setattr(dm, "search_step", lambda *a, **k: pytest.fail("a supernet step on resume"))
    again = make()
    setup2 = again.prepare(run_context(prep, tmp_path, resume=True), [])
    assert again.summary()["logits_history"] == summary["logits_history"]
    assert all(torch.equal(v, setup2.bank.state[k]) for k, v in setup.bank.state.items())
    assert [again.ask() for _ in range(3)] == widths


def test_prepare_binds_the_recorded_resolution(tmp_path):
    """With searched resolutions, `prepare` binds the one a resumed run's trials were recorded at (else the
    supernet's argmax) and returns it; the derived candidates are priced at it and the trials record it."""
    from onnxconet.search.resolution import graphs_at

    prep = prepare(TINY)
    cg = prep.graph
    space = WidthSpace(cg, min_ratio=0.25)
    config = DMaskingConfig(epochs=1, options=4, align=1, checkpoint=False)
    s = DMaskingStrategy(space, Objective(0.5), CostModel(cg, space, "flops"), config)
    setup = s.prepare(run_context(prep, tmp_path, resolutions=graphs_at(prep, [8, 12])), [{"resolution": 8}])
    assert (
        setup.resolution.size == 8
        and s.cg is setup.resolution.cg
        and s.dm_cost.resolution is setup.resolution
    )
    assert s.summary()["dmasking"]["resolution"] == 8 and not (tmp_path / CHECKPOINT).exists()
    w = s.ask()
    facts = s.tell(Trial(0, w, TrialState.COMPLETE, accuracy=0.5, ratio=0.4))
    assert facts["resolution"] == 8
    assert facts["predicted_ratio"] == pytest.approx(
        setup.resolution.scale * setup.resolution.effective.ratio(w)
    )


# --------------------------------------------------------------------------------------- end to end
def cfg(tmp_path, data, **kw):
    """`search_cfg` with dmasking: 2 trials, budget 0.5, a 2-epoch supernet over 4 width options, --align 1 (both
    of the tiny model's groups searched: with one, every derivation scales onto the same width)."""
    dm = {"strategy": "dmasking", "trials": 2, "pretrain_epochs": 3, "budget": "0.5", "align": 1}
    return search_cfg(tmp_path, data, **(dm | {"dmasking": {"epochs": 2, "options": 4}} | kw))


def test_dmasking_smoke(tmp_path, npz_data):
    """A dmasking run on the tiny model end to end: the best meets the budget, result.json carries the logits'
    history (one entry per supernet epoch), the report plots it, best.onnx matches torch."""
    res = run_search(cfg(tmp_path, npz_data)).to_json()
    best = res["best"]
    assert best["budget_met"] and best["flops_ratio"] <= 0.5 + 1e-9
    assert best["max_abs_diff"] < 1e-4
    hist = res["logits_history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert set(hist[-1]["probs"]) == {str(g) for g in res["dmasking"]["searched_groups"]}
    assert all(abs(sum(p) - 1) < 1e-3 for p in hist[-1]["probs"].values())
    trials = res["trials"]
    assert trials[0]["derived"] == "argmax" and trials[1]["derived"] in ("expected", "sample")
    assert trials[0]["widths"] != trials[1]["widths"] and "exhausted_after" not in res["dmasking"]
    assert "logits_history" in trials[0] and trials[0]["supernet"]["epochs"] == 2
    out = tmp_path / "run"
    assert (
        (out / "widths.png").is_file() and (out / "best.onnx").is_file() and (out / "dmasking.pt").is_file()
    )
    assert json.loads((out / "result.json").read_text())["logits_history"][-1]["epoch"] == 2
    assert "expected width" in (out / "report.md").read_text()


def test_dmasking_with_depth_meets_a_budget_only_a_removed_branch_meets(tmp_path, npz_data):
    """tiny_res at --align 8, the oracle of test_branches' knapsack run: only the 12-channel branch group is
    searched, and a 0.2 FLOPs budget is met only with that branch removed. dmasking --depth searches width 0,
    ships it in a file without the branch's convs, and then has nothing new to train."""
    res = run_search(cfg(tmp_path, npz_data, depth=True, align=8, budget="0.2")).to_json()
    best, dm = res["best"], res["dmasking"]
    cg = ChannelGraph(onnx.load(tmp_path / "run" / "baseline.onnx"))
    (branch,) = cg.removable
    assert dm["searched_groups"] == [branch] and dm["options"][str(branch)][0] == 0
    assert best["budget_met"] and best["flops_ratio"] <= 0.2 and best["max_abs_diff"] < 1e-4
    assert {int(k): v for k, v in best["widths"].items()}[branch] == 0
    shipped = onnx.load(tmp_path / "run" / "best.onnx")
    assert {n.input[1] for n in shipped.graph.node if n.op_type == "Conv"} == {"stem.0.weight"}
    assert dm["exhausted_after"] == 1 and len(res["trials"]) == 1


def test_dmasking_resume_after_kills(tmp_path, npz_data, monkeypatch):
    """Killed in the second supernet epoch: the resumed run does not redo the first. Killed during the derived
    trials: the resumed run trains no supernet step and redoes no finished trial."""
    from onnxconet.search import evaluate as ev
    from onnxconet.search.dmasking import supernet as dm

    real_step, real_run = dm.search_step, ev.Evaluator.run
    calls = {"n": 0, "kill": False}
    ckpt_path = tmp_path / "run" / "dmasking.pt"

    def step(*a, **k):
        if calls["kill"] and ckpt_path.is_file():  # the first step after epoch 1 was checkpointed
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(dm, "search_step", step)
    calls["kill"] = True
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg(tmp_path, npz_data, final_epochs=0))
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert int(ckpt["epoch"]) == 1
    steps_per_epoch = int(ckpt["step"])
    assert calls["n"] == steps_per_epoch > 0

    calls.update(n=0, kill=False)
    monkeypatch.setattr(ev.Evaluator, "run", killed_at_trial(1))
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg(tmp_path, npz_data, final_epochs=0, resume=True))
    assert calls["n"] == steps_per_epoch, "a finished supernet epoch was redone"
    history = [json.loads(ln) for ln in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    first = [r for r in history if r["kind"] == "trial"]
    assert [r["trial"] for r in first] == [0]

    calls["n"] = 0
    monkeypatch.setattr(ev.Evaluator, "run", real_run)
    seen = []
    res = run_search(
        cfg(tmp_path, npz_data, final_epochs=0, resume=True),
        progress=lambda e, d: seen.append(d["trial"]) if e == "trial_start" else None,
    ).to_json()
    assert calls["n"] == 0 and seen == [1]
    # (Trial.from_json fills a replayed record's "extra" in place; compare the rest)
    assert {k: v for k, v in res["trials"][0].items() if k != "extra"} == {
        k: v for k, v in first[0].items() if k != "extra"
    }
    assert [h["epoch"] for h in res["logits_history"]] == [0, 1, 2]


def test_dmasking_latency_budget_fbnet_loss(tmp_path, npz_data):
    """Budget on measured latency: the cost term is the calibrated predictor's expected latency (here with
    FBNet's multiplicative loss); the run finishes with a measured latency and the predictor saved."""
    res = run_search(
        cfg(
            tmp_path,
            npz_data,
            budget="0.9",
            budget_on="latency",
            trials=1,
            probes=4,
            dmasking={"epochs": 2, "options": 4, "align": 1, "loss": "fbnet", "warmup": 0.0},
        )
    ).to_json()
    hist = res["logits_history"]
    assert all(np.isfinite(h["expected_ratio"]) and 0 < h["expected_ratio"] < 2 for h in hist)
    assert hist[-1]["arch_loss"] is not None and np.isfinite(hist[-1]["arch_loss"])
    assert any(v != 0 for p in hist[-1]["logits"].values() for v in p)  # the logits moved
    assert res["best"]["latency_ms"] > 0 and (tmp_path / "run" / "latency_predictor.json").is_file()


def test_latency_candidates_are_checked_by_measurement(grouped, tmp_path):
    """When a derived candidate measures over the budget (the predictor is 30% optimistic here), it is corrected
    and put back on the budget before the driver sees it; the checks are cached, so a replay asks the same."""
    cg = grouped.graph
    space = WidthSpace(cg, min_ratio=0.25)
    params = EffectiveCost(cg, "params")
    base = sum(int(np.prod(t.dims)) for t in cg.graph.initializers.values() if t.data_type == 1)

    def measure(model):  # "latency" = 1.3 x the params ratio of the sliced ONNX
        return 1.3 * sum(
            int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1
        ) / base, 1.0

    calls = []
    judge = SimpleNamespace(measure=lambda m: calls.append(1) or measure(m))

    def make(resume):
        s = DMaskingStrategy(space, Objective(0.5), CostModel(cg, space, "latency"), DMaskingConfig(align=1))
        s.dm_cost.predictor = SimpleNamespace(predict_ratio=params.ratio)
        rng = np.random.default_rng(0)
        logits = {g: rng.normal(0, 1, len(o)) for g, o in s.options.items()}
        s.derive_from(
            SupernetResult(logits, 1.0), Checks(judged(judge, cg, cg.l1_scores()), tmp_path / CHECKS, resume)
        )
        return s

    s = make(False)
    asked = [s.ask() for _ in range(3)]
    for w in asked:
        assert 1.3 * params.ratio(w) <= 0.5 * s.config.margin + 1e-9
        assert params.ratio(w) > 0.25  # corrected onto the budget, not collapsed
    n_calls = len(calls)
    assert n_calls >= 3 and (tmp_path / "dmasking_checks.json").is_file()
    s2 = make(True)
    assert [s2.ask() for _ in range(3)] == asked and len(calls) == n_calls
