"""Measured loss curves (search/sensitivity.py) against oracles: channels that carry nothing cost no loss when cut,
channels that carry the signal do; the knapsack's moves over curves that are not concave; --importance loss in the
placer reads the data it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxconet.errors import OnnxconetError
from onnxconet.graph.export import export_onnx
from onnxconet.graph.groups import ChannelGraph
from onnxconet.search.knapsack import knapsack_widths
from onnxconet.search.sensitivity import curve_gain, cut_loss, loss_curves
from onnxconet.space import WidthSpace
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train.loop import recalibrate_bn
from tests.conftest import search_cfg
from tests.test_knapsack import TwoConv, _additive, _setup_ctx


def test_cutting_dead_channels_costs_no_loss_and_live_ones_do():
    """One of the first group's four channels is dead (weights, bias, BN scale and shift all 0: it outputs 0
    whatever the statistics): cutting to 3 keeps the whole network's loss to float precision, cutting further
    removes live channels and the loss moves."""
    torch.manual_seed(0)
    model = TwoConv().eval()
    with torch.no_grad():
        for p in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            p[1] = 0
        model.fc.weight.mul_(20)  # confident logits: the labels below are the whole network's own answers
    cg = ChannelGraph(export_onnx(model, (1, 1, 8, 8)))
    space = WidthSpace(cg, min_ratio=0.1)
    group = next(g for g in space if g.hi == 4)
    xs = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    recalibrate_bn(model, [(x, None) for x in xs[:2]], batches=2)  # the statistics every cut re-estimates
    with torch.no_grad():
        data = [(x, model(x).argmax(dim=1)) for x in xs]
    curves = loss_curves(space, cut_loss(cg, WeightBank(model), data[:2], data[2:]))
    curve = curves[group.id]
    assert set(curve) == set(group.options()) and set(curves) == {g.id for g in space}
    assert curve[3] == pytest.approx(curve[4], rel=1e-5, abs=1e-6)
    assert abs(curve[2] - curve[4]) > 1e-2 and abs(curve[1] - curve[4]) > 1e-2
    gain = curve_gain(curves)
    assert gain(group.id, 3, 4) == pytest.approx(0, abs=1e-5) and gain(group.id, 1, 4) == curve[1] - curve[4]
    assert all(p.grad is None for p in model.parameters())  # the original is left as it was


def test_knapsack_jumps_over_a_step_that_gains_nothing(tiny_graph):
    """A group whose first step gains nothing and whose second gains much (a residual branch at a few channels,
    worse than removed) gets both steps: a one-step greedy would spend the budget on the steady group."""
    space = WidthSpace(tiny_graph, min_ratio=0.25)
    a, b = [g.id for g in space][:2]
    ga, gb = space.groups[a], space.groups[b]
    assert ga.hi - ga.lo >= 2 * ga.step and gb.hi - gb.lo >= 2 * gb.step
    steps = {a: ga.step, b: gb.step}
    unit = {g.id: 1.0 if g.id in (a, b) else 1e3 for g in space}
    predict = _additive(tiny_graph, space, {g: u / steps.get(g, 1) for g, u in unit.items()})

    def gain(gid, w0, w1):
        if gid == a:  # 0 for the first step, 10 once two steps are taken
            return 10.0 * ((w1 - ga.lo) >= 2 * ga.step) - 10.0 * ((w0 - ga.lo) >= 2 * ga.step)
        return (w1 - w0) / steps.get(gid, 1)  # 1 per step

    budget = predict(space.smallest()) + 2.0  # room for two steps
    w = knapsack_widths(tiny_graph, space, gain, predict, budget)
    assert w[a] == ga.lo + 2 * ga.step and w[b] == gb.lo


def test_loss_importance_places_from_the_measured_curves(tiny_graph, npz_data, monkeypatch, tmp_path):
    """--importance loss: the placer measures the curves on fixed training batches (the same list for every cut)
    and the validation split's first batches in order, and fills the knapsack with exactly those curves."""
    from torch.utils.data import DataLoader

    from onnxconet.search import setup
    from onnxconet.search.cost import CostModel

    space = WidthSpace(tiny_graph, min_ratio=0.25, align=1)
    cost = CostModel(tiny_graph, space, "flops")
    ctx = _setup_ctx(tiny_graph, npz_data, strategy="knapsack", importance="loss", out=tmp_path)
    seen = {}

    def spy_loss(cg, bank, calibration, validation, **kw):
        seen.update(calibration=calibration, validation=validation)
        return cut_loss(cg, bank, calibration, validation, **kw)

    def spy_curves(sp, loss, **kw):
        seen["curves"] = loss_curves(sp, loss, **kw)
        return seen["curves"]

    monkeypatch.setattr(setup, "cut_loss", spy_loss)
    monkeypatch.setattr(setup, "loss_curves", spy_curves)
    budget = 0.45
    widths = setup.saliency_placer(ctx, space, cost)(budget)
    val = [x for x, _ in DataLoader(ctx.loaders.val.dataset, batch_size=32)]
    assert isinstance(seen["calibration"], list) and len(seen["calibration"]) == min(
        10, len(ctx.loaders.train)
    )
    got = [x for x, _ in seen["validation"]]
    assert len(got) == min(len(val), setup.CURVE_IMAGES // 32)
    assert all(torch.equal(a, b) for a, b in zip(got, val, strict=False))
    assert widths == knapsack_widths(tiny_graph, space, curve_gain(seen["curves"]), cost.predict, budget)
    assert cost.predict(widths) <= budget
    cuts = sum(len(g.options()) for g in space)
    assert [d for e, d in ctx.events if e == "cuts"] == [
        {"done": i, "total": cuts} for i in range(1, cuts + 1)
    ]
    for g in space:  # maximal: no wider width of any group fits
        assert all(cost.predict({**widths, g.id: o}) > budget for o in g.options() if o > widths[g.id])


@pytest.mark.parametrize("strategy,start,ok", [("knapsack", "smallest", True), ("anneal", "knapsack", True),
                                               ("anneal", "uniform", False), ("l1", "uniform", False)])  # fmt: skip
def test_importance_is_checked(tmp_path, npz_data, strategy, start, ok):
    cfg = search_cfg(tmp_path, npz_data, strategy=strategy, start=start, importance="loss")
    if ok:
        cfg.check()
    else:
        with pytest.raises(OnnxconetError, match="--importance loss ranks channels for the latency saliency"):
            cfg.check()
    with pytest.raises(OnnxconetError, match="--importance 'x' is not taylor, loss or path"):
        search_cfg(tmp_path, npz_data, importance="x").check()


def test_loss_curves_are_saved_and_reused_on_resume(tiny_graph, npz_data, monkeypatch, tmp_path):
    """The curves go to the run directory; --resume places from them without measuring again, and a file that
    does not fit (other widths allowed, unreadable) is measured afresh."""
    from onnxconet.search import setup
    from onnxconet.search.cost import CostModel
    from onnxconet.search.sensitivity import CURVES

    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return loss_curves(*a, **kw)

    monkeypatch.setattr(setup, "loss_curves", counting)
    space = WidthSpace(tiny_graph, min_ratio=0.25, align=1)
    cost = CostModel(tiny_graph, space, "flops")
    ctx = _setup_ctx(tiny_graph, npz_data, strategy="knapsack", importance="loss", out=tmp_path)
    first = setup.saliency_placer(ctx, space, cost)(0.45)
    assert len(calls) == 1 and (tmp_path / CURVES).is_file()
    ctx.cfg.resume = True
    assert setup.saliency_placer(ctx, space, cost)(0.45) == first and len(calls) == 1  # restored
    other = WidthSpace(tiny_graph, min_ratio=0.5, align=1)
    setup.saliency_placer(ctx, other, CostModel(tiny_graph, other, "flops"))(0.45)
    assert len(calls) == 2  # the saved curves do not cover these widths
    (tmp_path / CURVES).write_text("{")
    assert setup.saliency_placer(ctx, space, cost)(0.45) == first and len(calls) == 3


def test_importance_loss_end_to_end(tmp_path, npz_data):
    """`search --strategy knapsack --start smallest --importance loss` on a FLOPs budget (exact: no timing): the
    run records its importance, leaves its curves beside result.json, and its trial's widths are the fill of
    those curves on the budget."""
    import json

    from onnxconet.commands.search import run_search
    from onnxconet.prepare import prepare
    from onnxconet.search.cost import CostModel
    from onnxconet.search.sensitivity import CURVES, load_curves
    from tests.conftest import MIX

    cfg = search_cfg(
        tmp_path, npz_data, model=MIX, strategy="knapsack", start="smallest", importance="loss", trials=1,
        final_epochs=0, align=1,
    )  # fmt: skip
    res = run_search(cfg).to_json()
    assert res["config"]["importance"] == "loss"
    cg = prepare(MIX).graph
    space = WidthSpace(cg, min_ratio=0.25, align=1)
    curves = load_curves(tmp_path / "run" / CURVES, cg, space)
    assert curves is not None
    widths = {int(k): v for k, v in res["trials"][0]["widths"].items()}
    flops = CostModel(cg, space, "flops").predict
    assert widths == knapsack_widths(cg, space, curve_gain(curves), flops, 0.6)
    header = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[0])
    assert header["config"]["importance"] == "loss"


def _path_setup():
    torch.manual_seed(0)
    model = TwoConv().eval()
    cg = ChannelGraph(export_onnx(model, (1, 1, 8, 8)))
    space = WidthSpace(cg, min_ratio=0.25, align=1)
    xs = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    with torch.no_grad():
        data = [(x, model(x).argmax(dim=1)) for x in xs]
    return model, cg, space, data[:2], data[2:]


def test_loss_path_measures_each_cut_where_the_steps_before_left_it():
    """Oracle: at every step the path takes, among each group's candidate (its widest width saving at least
    `step` of the predicted cost, else its next width), the one with the least measured loss per cost saved,
    every loss measured with the cuts before applied (recomputed here with `_loss` directly); the predicted cost
    falls at every step; `place` gives the first point within a budget, further along for a lower one."""
    from onnxconet.search.cost import CostModel
    from onnxconet.search.sensitivity import LossPath, _loss, cut_loss

    model, cg, space, cal, val = _path_setup()
    predict = CostModel(cg, space, "flops").predict
    bank = WeightBank(model)
    walk = LossPath(space, cut_loss(cg, bank, cal, val), predict, step=0.25)
    order = bank.scores(cg)
    while True:
        widths, cost, loss = walk.points[-1]
        assert loss == pytest.approx(_loss(cg, bank, widths, order, cal, val, 10, None), rel=1e-6)
        expected, best = None, float("inf")
        for g in space:
            narrower = [o for o in g.options() if o < widths[g.id]][::-1]
            if not narrower:
                continue
            to = next(
                (o for o in narrower if cost - predict({**widths, g.id: o}) >= 0.25 * cost), narrower[0]
            )
            cand = {**widths, g.id: to}
            score = (_loss(cg, bank, cand, order, cal, val, 10, None) - loss) / (cost - predict(cand))
            if score < best:
                expected, best = cand, score
        if not walk.extend():
            assert expected is None
            break
        assert walk.points[-1][0] == expected and walk.points[-1][1] < cost
    assert walk.points[-1][0] == space.smallest() and len(walk.points) > 3
    costs = [c for _, c, _ in walk.points]
    for i, c in enumerate(costs):
        assert walk.place(c) == walk.points[i][0]  # at the points' own costs
    assert walk.place(0.0) == space.smallest()  # below the smallest: the path's end
    # between two points the steps that led there are undone, the last first, as far as the budget allows: the
    # result fits, starts from the first point within, and no step's cut group can go wider and still fit
    for b in np.linspace(costs[-1], costs[0], 23)[1:-1]:
        _assert_refilled(walk.points, walk.place(b), b, predict, space)


def _assert_refilled(points, got, budget, predict, space):
    """`got` fits `budget`, starts from the path's first point within it, and no cut of the steps that led there
    can be undone any further within the budget."""
    i = next(i for i, (w, _, _) in enumerate(points) if predict(w) <= budget)
    assert predict(got) <= budget and all(points[i][0][g] <= got[g] for g in got)
    for k in range(1, i + 1):
        before, after = points[k - 1][0], points[k][0]
        gid = next(g for g in after if after[g] != before[g])
        wider = [o for o in space.groups[gid].options() if got[gid] < o <= before[gid]]
        assert all(predict({**got, gid: o}) > budget for o in wider), (budget, k)


def test_loss_path_grows_on_demand_and_resumes_from_its_file(tiny_graph, npz_data, tmp_path):
    """--importance path: the placer walks only as far as the budget asks and saves every step; --resume
    continues from the saved steps without measuring them again; a file of other widths is walked afresh."""
    from onnxconet.search import setup
    from onnxconet.search.cost import CostModel
    from onnxconet.search.sensitivity import PATH, LossPath

    space = WidthSpace(tiny_graph, min_ratio=0.25, align=1)
    cost = CostModel(tiny_graph, space, "flops")
    ctx = _setup_ctx(tiny_graph, npz_data, strategy="knapsack", importance="path", out=tmp_path)
    place = setup.saliency_placer(ctx, space, cost)
    high = place(0.8)
    saved = LossPath.saved_points(tmp_path / PATH, tiny_graph, space, setup.PATH_STEP)
    _assert_refilled(saved, high, 0.8, cost.predict, space)
    assert all(cost.predict(w) > 0.8 for w, _, _ in saved[:-1])  # it stopped at the first point within
    steps = [d["step"] for e, d in ctx.events if e == "path"]
    assert steps == list(range(1, len(saved)))
    low = place(0.4)
    longer = LossPath.saved_points(tmp_path / PATH, tiny_graph, space, setup.PATH_STEP)
    assert len(longer) > len(saved) and longer[: len(saved)] == saved
    _assert_refilled(longer, low, 0.4, cost.predict, space)
    ctx.cfg.resume, ctx.events[:] = True, []
    again = setup.saliency_placer(ctx, space, cost)
    assert again(0.4) == low and again(0.8) == high
    assert not [e for e, _ in ctx.events if e == "path"]  # nothing measured again
    other = WidthSpace(tiny_graph, min_ratio=0.5, align=1)
    assert LossPath.saved_points(tmp_path / PATH, tiny_graph, other, setup.PATH_STEP) is None


def test_importance_path_end_to_end(tmp_path, npz_data):
    """`search --strategy knapsack --importance path` on a FLOPs budget: the trial trains the first point of the
    saved path within the budget, refilled."""
    from onnxconet.commands.search import run_search
    from onnxconet.prepare import prepare
    from onnxconet.search.cost import CostModel
    from onnxconet.search.sensitivity import PATH, LossPath
    from onnxconet.search.setup import PATH_STEP
    from tests.conftest import MIX

    cfg = search_cfg(
        tmp_path, npz_data, model=MIX, strategy="knapsack", importance="path", trials=1, final_epochs=0, align=1,
    )  # fmt: skip
    res = run_search(cfg).to_json()
    assert res["config"]["importance"] == "path"
    cg = prepare(MIX).graph
    space = WidthSpace(cg, min_ratio=0.25, align=1)
    points = LossPath.saved_points(tmp_path / "run" / PATH, cg, space, PATH_STEP)
    flops = CostModel(cg, space, "flops").predict
    assert flops(points[-1][0]) <= 0.6 < flops(points[-2][0])  # walked as far as the budget asked
    _assert_refilled(points, {int(k): v for k, v in res["trials"][0]["widths"].items()}, 0.6, flops, space)
