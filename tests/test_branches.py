"""Depth as a width: a group whose residual branch can be removed takes width 0 (graph/branches.py)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from onnxconet.errors import SurgeryError
from onnxconet.graph.export import export_onnx
from onnxconet.graph.groups import ChannelGraph
from onnxconet.latency.predictor import _NO_COST, LatencyFeatures, LatencyPredictor
from onnxconet.load import load_model
from onnxconet.space import WidthSpace
from onnxconet.surgery.onnx import check_onnx, slice_onnx
from onnxconet.surgery.parity import onnx_with_weights
from onnxconet.surgery.torch import slice_torch, zero_pruned
from tests.oracle import randomize_norms, run_onnx, run_torch


class Plain(nn.Module):
    """No residual: nothing may go."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def resnet20():
    loaded = load_model("models/fashion_mnist.py:resnet20")
    model = randomize_norms(loaded.module)
    return model, ChannelGraph(export_onnx(model, loaded.input_shape)), loaded.input_shape


def test_removable_groups_are_the_residual_branches(resnet20):
    _, cg, _ = resnet20
    # the oracle: a block's inner group (produced by its conv1 only) feeds a branch that ends in the residual Add;
    # the stage groups (stem, conv2s, shortcuts) carry the residual path itself
    inner = {g.id for g in cg.prunable if all(m.endswith(".conv1") and m != "conv1" for m in g.modules)}
    assert len(inner) == 9
    assert set(cg.removable) == inner
    for gid, nodes in cg.removable.items():
        ops = sorted(n.op for n in cg.graph.nodes if n.name in nodes)
        assert ops.count("Conv") == 2 and "Add" not in ops, (gid, ops)  # conv1, conv2 go; the merge stays
    assert ChannelGraph(export_onnx(Plain().eval(), (1, 3, 8, 8))).removable == {}


@pytest.mark.parametrize("spec", ["models/fashion_mnist.py:resnet20", "models/fashion_mnist.py:mobilenetv2"])
def test_removed_branches_equal_the_zeroed_original(spec):
    """ONNX and torch surgeries at width 0 give the outputs of the original with those channels zeroed."""
    loaded = load_model(spec)
    model = randomize_norms(loaded.module)
    proto = export_onnx(model, loaded.input_shape)
    cg = ChannelGraph(proto)
    assert cg.removable
    widths = {g.id: max(g.channels // 2, 1) for g in cg.prunable}
    gone = sorted(cg.removable)[::2]
    widths.update({gid: 0 for gid in gone})
    keep = cg.keep_mask(widths)
    assert all(not keep[cg.groups[gid].bundles].any() for gid in gone)
    pruned = slice_onnx(cg, keep)
    check_onnx(pruned)
    x = np.random.default_rng(0).standard_normal(loaded.input_shape).astype(np.float32)
    oracle = run_torch(zero_pruned(model, cg, keep), x)
    torch_pruned = slice_torch(model, cg.param_slices(keep))
    np.testing.assert_allclose(run_onnx(pruned, x), oracle, atol=1e-5 * np.abs(oracle).max())
    np.testing.assert_allclose(run_torch(torch_pruned, x), oracle, atol=1e-5 * np.abs(oracle).max())
    # the branches' layers are gone from the file, the others stay
    removed = {n for gid in gone for n in cg.removable[gid]}
    convs = lambda m: sum(n.op_type == "Conv" for n in m.graph.node)  # noqa: E731
    assert convs(pruned) == convs(proto) - sum(
        1 for n in cg.graph.nodes if n.name in removed and n.op == "Conv"
    )
    # the pruned torch model trains (the emptied modules run forward and backward), copies and pickles
    train = copy.deepcopy(torch_pruned).train()
    loss = train(torch.from_numpy(np.repeat(x, 2, axis=0))).square().mean()
    loss.backward()
    assert np.isfinite(loss.item())
    # trained weights reach the file by name: the BatchNorm after a removed branch keeps its new statistics
    trained = onnx_with_weights(pruned, train.state_dict())
    y = run_torch(train, x)
    np.testing.assert_allclose(run_onnx(trained, x), y, atol=1e-5 * np.abs(y).max())
    again = pickle.loads(pickle.dumps(torch_pruned))
    np.testing.assert_array_equal(run_torch(again, x), run_torch(torch_pruned, x))


def test_width_zero_only_where_the_branch_can_go(resnet20):
    _, cg, _ = resnet20
    stage = next(g.id for g in cg.prunable if g.id not in cg.removable)
    with pytest.raises(SurgeryError, match=f"group {stage}: width 0"):
        cg.keep_mask({stage: 0})
    inner = min(cg.removable)
    with pytest.raises(SurgeryError, match="or 0: its branch can be removed"):
        cg.keep_mask({inner: -1})


def test_space_offers_zero_only_with_depth(resnet20):
    _, cg, _ = resnet20
    plain, deep = WidthSpace(cg, align=4), WidthSpace(cg, align=4, depth=True)
    for g in deep:
        assert (0 in g.options()) == (g.id in cg.removable)
        assert 0 not in plain.groups[g.id].options()
    assert all(deep.smallest()[gid] == 0 for gid in cg.removable)
    assert 0 not in deep.uniform(0.01).values()  # uniform scaling keeps every block
    g = deep.groups[min(cg.removable)]
    assert g.clip(g.lo / 2 - 0.1) == 0 and g.clip(g.lo / 2 + 0.1) == g.lo and g.up(0) == g.lo
    assert deep.contains(deep.smallest()) and not plain.contains(deep.smallest())


def test_predictor_sees_the_nodes_a_branch_removes(resnet20):
    """Fitted on latencies that are MACs plus a launch cost per node (a removed branch's nodes launch nothing),
    the predictor recovers what removing a branch saves beyond its narrowest width."""
    _, cg, _ = resnet20
    f = LatencyFeatures(cg)
    assert "nodes" in f.names
    space = WidthSpace(cg, align=4, depth=True)
    rng = np.random.default_rng(0)
    configs = [space.sample(rng) for _ in range(40)]
    costed = [n.name for n in cg.graph.nodes if n.op not in _NO_COST]
    per_node = 0.2 / len(costed)  # launches: 0.2 of the reference, the MACs the other 0.8

    def truth(widths):
        gone = {n for g, w in widths.items() if w == 0 for n in cg.removable[g]}
        macs = f.macs([widths])[0] / f.macs([{}])[0]
        return 0.8 * macs + per_node * sum(n not in gone for n in costed)

    pred = LatencyPredictor.fit(f, configs, [truth(c) for c in configs], reference_ms=1.0)
    full = space.full()
    one_gone = {**full, min(cg.removable): 0}
    narrow = {**full, min(cg.removable): space.groups[min(cg.removable)].lo}
    drop = pred.predict_ratio(narrow) - pred.predict_ratio(one_gone)
    assert truth(narrow) - truth(one_gone) > 4 * per_node
    assert drop == pytest.approx(truth(narrow) - truth(one_gone), rel=0.1)
    back = LatencyPredictor.from_json(pred.to_json(), cg)
    assert back.predict_ratio(one_gone) == pytest.approx(pred.predict_ratio(one_gone))
    # the differentiable expectation agrees with the point prediction at a one-hot distribution
    gid = min(cg.removable)
    opts = space.groups[gid].options()
    probs = {gid: torch.tensor([1.0] + [0.0] * (len(opts) - 1))}
    exp = pred.expected_latency(probs, {gid: opts}, widths=full, unit="ratio")
    assert float(exp) == pytest.approx(pred.predict_ratio(one_gone), rel=1e-6)


@pytest.mark.parametrize("spec", ["models/fashion_mnist.py:resnet20", "models/fashion_mnist.py:mobilenetv2"])
def test_predictor_features_at_width_zero_are_those_of_the_file_without_the_branch(spec):
    """The oracle is the pruned file itself: every feature (MACs, weights, the activations each layer reads and
    writes, the per-channel and memory ops' elements) of the original at widths with branches removed equals the
    same feature read from the sliced file at its full width. A removed branch's first conv no longer reads the
    residual stream and its last conv and BatchNorm no longer write it (the features once kept those, and the
    predictor over-priced ResNet-20 widths with five branches removed at 0.50 of the reference when they
    measured 0.29). The launch count is left out: the file keeps a removed branch's BatchNorm on constants,
    which onnxruntime folds at load time."""
    loaded = load_model(spec)
    cg = ChannelGraph(export_onnx(loaded.module.eval(), loaded.input_shape))
    widths = {g.id: max(g.channels // 2, 1) for g in cg.prunable}
    widths.update({gid: 0 for gid in sorted(cg.removable)[::2]})
    f = LatencyFeatures(cg)
    mine = dict(zip(f.names, f.matrix([widths])[0] * np.asarray(f.scale), strict=True))
    sliced = LatencyFeatures(ChannelGraph(slice_onnx(cg, cg.keep_mask(widths))))
    theirs = dict(zip(sliced.names, sliced.matrix([{}])[0] * np.asarray(sliced.scale), strict=True))
    assert set(mine) - {"nodes"} == set(theirs) - {"nodes"}
    for name in set(theirs) - {"nodes"}:
        assert mine[name] == pytest.approx(theirs[name], rel=1e-9), name
    # and what the removal saves is not only launches: the activations read and written fall too
    whole, gone = f.matrix([{**widths, **{g: 1 for g in cg.removable if widths[g] == 0}}, widths])
    acts = [i for i, n in enumerate(f.names) if n.endswith(".act")]
    ew = f.names.index("ew")
    assert gone[acts].sum() < whole[acts].sum() and gone[ew] < whole[ew]


def test_search_with_depth_reaches_a_budget_only_a_removed_branch_meets(tmp_path, npz_data):
    """tiny_res at --align 8: the 8-channel stem group stays whole, the 12-channel branch group goes down to 3
    (0.33 of the MACs); removing the branch leaves the stem (0.11). A 0.2 budget is refused with --no-depth and
    met with --depth (the knapsack's default), by shipping the branch at 0 in a file that has no conv of it."""
    from onnxconet.commands.search import run_search
    from onnxconet.errors import BudgetError
    from tests.conftest import search_cfg

    base = dict(strategy="knapsack", start="smallest", budget="0.2", trials=1, final_epochs=0, min_ratio=0.25)
    with pytest.raises(BudgetError, match="out of reach"):
        run_search(search_cfg(tmp_path / "plain", npz_data, depth=False, **base))
    res = run_search(search_cfg(tmp_path / "deep", npz_data, depth=True, **base)).to_json()
    best = res["best"]
    assert best["budget_met"] and best["flops_ratio"] <= 0.2
    widths = {int(k): v for k, v in best["widths"].items()}
    cg = ChannelGraph(onnx.load(tmp_path / "deep" / "run" / "baseline.onnx"))
    (branch,) = cg.removable
    assert widths[branch] == 0
    shipped = onnx.load(tmp_path / "deep" / "run" / "best.onnx")
    conv_weights = {n.input[1] for n in shipped.graph.node if n.op_type == "Conv"}
    assert conv_weights == {"stem.0.weight"}  # conv1.0 and conv2.0 went with the branch


def test_conet_metrics_skip_a_removed_branch(resnet20):
    """anneal scores groups by CONetV2's QC of their layers' weights: a removed branch has none (empty weights),
    the other groups keep theirs."""
    from types import SimpleNamespace

    from onnxconet.search.evaluate import Evaluator

    model, cg, _ = resnet20
    gone = min(cg.removable)
    keep = cg.keep_mask({gone: 0})
    pruned = slice_torch(model, cg.param_slices(keep))
    scored = Evaluator.group_metrics(SimpleNamespace(cg=cg), pruned)
    assert gone not in scored
    assert set(scored) == {g.id for g in cg.prunable} - {gone}
    assert all(np.isfinite(v) for v in scored.values())
