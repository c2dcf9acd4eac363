"""dmasking's input-resolution search (--resolutions): per-resolution graphs and costs, gradients to the
resolution logits, the chosen resolution in result.json and best.onnx (checked in onnxruntime against torch),
one-line errors, resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from onnxconet.cli import app
from onnxconet.commands.search import SearchConfig, run_search
from onnxconet.errors import OnnxconetError
from onnxconet.prepare import prepare
from onnxconet.search.base import Objective
from onnxconet.search.cost import CostModel
from onnxconet.search.dmasking import DMaskingConfig, DMaskingStrategy
from onnxconet.search.dmasking.step import SearchStep, search_step
from onnxconet.search.masks import Supernet
from onnxconet.search.resolution import ResizedLoader, bind_costs, graphs_at, parse_resolutions
from onnxconet.space import WidthSpace
from onnxconet.surgery.torch import slice_torch
from tests.conftest import TINY
from tests.test_dmasking import cfg, killed_at_trial

FLAT = """import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 16 * 16, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.a(x), 1))


def flat():
    return Flat()
"""


def strategy_at(prep, sizes, on="flops"):
    cg = prep.graph
    space = WidthSpace(cg, min_ratio=0.25)
    res = graphs_at(prep, sizes)
    bind_costs(SimpleNamespace(cg=cg, budget=SimpleNamespace(on=on)), res, space)
    s = DMaskingStrategy(space, Objective(0.5), CostModel(cg, space, on), DMaskingConfig(options=4, align=1))
    s.dm_cost.search_resolutions(res)
    return s, res


def test_costs_per_resolution(tiny):
    """FLOPs at 8x8 and 12x12 relative to the 16x16 baseline: the convs scale with the pixel count; with a
    one-hot resolution the expected cost is that resolution's ratio to the baseline."""
    s, res = strategy_at(tiny, [8, 12, 16])
    assert [r.size for r in res] == [8, 12, 16] and res[2].cg is tiny.graph
    assert res[2].scale == 1.0
    assert all(r.cg.fingerprint() == tiny.graph.fingerprint() for r in res)  # widths files stay valid
    assert 0.24 < res[0].scale < 0.27 and 0.55 < res[1].scale < 0.58
    w = {g: s.options[g][0] for g in s.options}
    probs = {g: torch.eye(len(o), dtype=torch.float64)[0] for g, o in s.options.items()}
    for i, r in enumerate(res):
        e = s.dm_cost.expected_ratio(probs, s.options, torch.eye(3, dtype=torch.float64)[i])
        assert float(e) == pytest.approx(s.dm_cost.predict_raw(w, r), rel=1e-9)
        assert s.dm_cost.predict_raw(w, r) == pytest.approx(r.scale * r.effective.ratio(w))


@pytest.mark.slow  # 18 s of real latency calibration per resolution
def test_latency_costs_per_resolution(tiny, tmp_path, monkeypatch):
    """Budget on latency: each resolution gets a predictor calibrated on its graph and the measured ratio of its
    full-width model to the baseline; both are saved, and a resumed run loads them without measuring."""
    from onnxconet.latency import predictor as lp
    from onnxconet.latency.profile import Target
    from onnxconet.search import calibration
    from onnxconet.surgery.parity import onnx_with_weights

    cg = tiny.graph
    space = WidthSpace(cg, min_ratio=0.25)
    reference = onnx_with_weights(tiny.onnx_model, tiny.loaded.module.state_dict()).SerializeToString()

    def ctx(resume):
        return SimpleNamespace(
            cg=cg, budget=SimpleNamespace(on="latency"), teacher=tiny.loaded.module, out=tmp_path,
            judge=SimpleNamespace(reference=reference, target=Target(provider="cpu", threads=1)),
            cfg=SimpleNamespace(resume=resume, seed=0, latency_seconds=0.2), stage=lambda text: None,
        )  # fmt: skip

    res = graphs_at(tiny, [8, 16])
    bind_costs(ctx(False), res, space, probes=4)
    assert res[1].scale == 1.0 and 0.05 < res[0].scale < 1.5
    assert res[0].predictor.report.measurements == 4 and res[0].cg is not cg
    assert (tmp_path / "latency_predictor_8.json").is_file() and (tmp_path / "resolutions.json").is_file()
    for module in (lp, calibration):
        monkeypatch.setattr(module, "calibrate", lambda *a, **k: pytest.fail("measured again on resume"))
    again = graphs_at(tiny, [8, 16])
    bind_costs(ctx(True), again, space, probes=4)
    assert (
        again[0].scale == res[0].scale
        and again[0].predictor.theta.tolist() == res[0].predictor.theta.tolist()
    )


def test_resolution_logits_get_gradients(tiny):
    """One search step: the weights step runs at a sampled resolution, the logits step gives the resolution
    logits a gradient from the task loss (expectation over resolutions) and the cost term."""
    s, _ = strategy_at(tiny, [8, 12, 16])
    model = tiny.loaded.module.train()
    net = Supernet(model, tiny.graph, s.options, tiny.graph.l1_scores())
    net.logits["resolution"] = torch.nn.Parameter(torch.zeros(3))
    wopt = torch.optim.SGD(model.parameters(), lr=0.01)
    aopt = torch.optim.Adam(net.parameters(), lr=0.01)
    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,)))
    arch = (torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,)))
    net.attach()
    try:
        step = SearchStep(net, model, None, wopt, aopt, s.dm_cost, alpha=0.0, temperature=4.0)
        loss, aloss, ratio = search_step(step, batch, arch, 2.0, torch.Generator().manual_seed(0))
    finally:
        net.detach()
    g = net.logits["resolution"].grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(loss) and torch.isfinite(aloss) and 0 < float(ratio) < 1
    for gid in net.gids:
        assert net.logits[str(gid)].grad.abs().sum() > 0, gid


def _torch_from_onnx(path: Path, widths: dict) -> torch.nn.Module:
    """The tiny model cut to `widths` with the weights stored in the ONNX file (initializer = state_dict key)."""
    prep = prepare(TINY)
    cg = prep.graph
    keep = cg.keep_mask({int(g): w for g, w in widths.items()})
    model = slice_torch(prep.loaded.module, cg.param_slices(keep)).eval()
    state = {
        i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
        for i in onnx.load(path).graph.initializer
    }
    missing, _ = model.load_state_dict(
        {k: v for k, v in state.items() if k in model.state_dict()}, strict=False
    )
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return model


def test_dmasking_resolution_end_to_end(tmp_path, npz_data):  # noqa: F811
    """Resolutions 8 and 12 for a 16x16 model: the chosen one is written into result.json, report.md, the
    history and best.onnx's input; best.onnx runs at it in onnxruntime like the torch model with its weights;
    the budget is met relative to the baseline at 16x16."""
    res = run_search(cfg(tmp_path, npz_data, resolutions=[8, 12], pretrain_epochs=1)).to_json()
    r = res["resolution"]
    assert r in (8, 12)
    assert res["input_shape"] == [1, 3, r, r] and res["baseline"]["input_shape"] == [1, 3, 16, 16]
    best = res["best"]
    assert best["budget_met"] and best["flops_ratio"] <= 0.5 + 1e-9 and best["max_abs_diff"] < 1e-4
    out = tmp_path / "run"
    saved = json.loads((out / "result.json").read_text())
    assert saved["resolution"] == r and saved["config"]["resolutions"] == [8, 12]
    hist = saved["logits_history"]
    assert all(len(h["resolution_probs"]) == 2 and h["resolutions"] == [8, 12] for h in hist)
    assert hist[-1]["argmax_resolution"] == r == res["dmasking"]["resolution"]
    assert all(t["resolution"] == r for t in res["trials"])
    assert f"**{r}×{r}**" in (out / "report.md").read_text()
    proto = onnx.load(out / "best.onnx")
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, r, r]
    assert {p.key: p.value for p in proto.metadata_props}["onnxconet.resolution"] == str(r)
    x = np.random.default_rng(1).standard_normal((1, 3, r, r)).astype(np.float32)
    sess = ort.InferenceSession(str(out / "best.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    model = _torch_from_onnx(out / "best.onnx", best["widths"])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    # the baseline keeps its own input
    base = onnx.load(out / "baseline.onnx")
    assert [d.dim_value for d in base.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]


def test_bad_resolutions_are_one_line_errors(tmp_path):
    with pytest.raises(OnnxconetError, match="--strategy dmasking"):
        SearchConfig(strategy="anneal", resolutions=[24]).check()
    with pytest.raises(OnnxconetError, match="below 8"):
        parse_resolutions("4,16")
    with pytest.raises(OnnxconetError, match="comma list"):
        parse_resolutions("24x24")
    path = tmp_path / "flat.py"
    path.write_text(FLAT)
    with pytest.raises(OnnxconetError, match="resolutions 12: .*global pooling"):
        graphs_at(prepare(f"{path}:flat"), [12, 16])
    r = CliRunner().invoke(
        app,
        [
            "search",
            f"{path}:flat",
            "--strategy",
            "dmasking",
            "--resolutions",
            "12,16",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 1
    msg = " ".join(r.output.split())
    assert "resolutions 12" in msg and "global pooling" in msg and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["search", "--resolutions", "24,32", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "--strategy dmasking" in " ".join(r.output.split())


def test_resized_loader():
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(10, 3, 16, 16), torch.arange(10)), batch_size=4
    )
    rl = ResizedLoader(loader, 12)
    shapes = [tuple(x.shape) for x, _ in rl]
    assert shapes == [(4, 3, 12, 12), (4, 3, 12, 12), (2, 3, 12, 12)] and len(rl) == 3 and rl.batch_size == 4


@pytest.mark.slow  # 31 s; dmasking's resume is in the default run (test_dmasking.py), this adds the resolution
def test_dmasking_resolution_resume(tmp_path, npz_data, monkeypatch):  # noqa: F811
    """Killed during the derived trials: the resumed run trains no supernet step, rebinds the same resolution
    and redoes no finished trial."""
    from onnxconet.search import evaluate as ev
    from onnxconet.search.dmasking import supernet as dm

    real_step, real_run = dm.search_step, ev.Evaluator.run
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(dm, "search_step", step)
    monkeypatch.setattr(ev.Evaluator, "run", killed_at_trial(1))
    # budget 0.2: at 8x8 the full widths cost 0.25 of the 16x16 baseline, so a looser budget puts every derivation
    # on the full widths there and the run rightly stops after one trial (nothing new: `dmasking.exhausted_after`)
    c = dict(resolutions=[8, 12], final_epochs=0, pretrain_epochs=1, budget="0.2")
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg(tmp_path, npz_data, **c))
    assert calls["n"] > 0
    history = [json.loads(ln) for ln in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    first = [h for h in history if h["kind"] == "trial"]
    assert len(first) == 1 and first[0]["resolution"] in (8, 12)

    calls["n"] = 0
    monkeypatch.setattr(ev.Evaluator, "run", real_run)
    seen = []
    res = run_search(
        cfg(tmp_path, npz_data, resume=True, **c),
        progress=lambda e, d: seen.append(d["trial"]) if e == "trial_start" else None,
    ).to_json()
    assert calls["n"] == 0 and seen == [1]
    assert res["resolution"] == first[0]["resolution"] == res["trials"][1]["resolution"]
