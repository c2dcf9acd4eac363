"""Long checks, run with `python -m pytest -m slow` (not in the default run): every torchvision CNN classifier
pruned with parity against the pruned PyTorch model, and the full default search (the README's main command).
Timings on the 2-core CI kind are in the README."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torchvision

pytestmark = pytest.mark.slow

TRANSFORMERS = ("vit_", "swin_", "maxvit")
ZOO = [n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(TRANSFORMERS)]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_prune_parity(name, tmp_path):
    """`prune torchvision:NAME --ratio 0.5` on random weights: some channels go, the ONNX file runs in
    onnxruntime and matches the pruned PyTorch model (the shape of the output; the values to 1e-3 relative)."""
    from onnxconet.commands.prune import prune_model
    from onnxconet.prepare import prepare

    prep = prepare(f"torchvision:{name}")
    res = prune_model(prep, 0.5, tmp_path / "p.onnx")
    assert res["groups_pruned"] > 0 and res["flops_after"] < res["flops_before"], name
    assert res["max_rel_diff"] is not None and res["max_rel_diff"] < 1e-3, (name, res["max_rel_diff"])
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    shape = [1, *prep.loaded.input_shape[1:]]
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros(shape, np.float32)})[0]
    assert list(y.shape) == res["output_shape"]


def test_default_search_end_to_end(tmp_path):
    """The README's main job (`onnxconet search`, no arguments: the built-in model on digits) with its default
    settings: finishes, meets its latency budget as deployed, ships a file whose outputs equal the pruned
    model's, and says what it shipped."""
    from onnxconet.commands.search import SearchConfig, run_search

    cfg = SearchConfig(out=str(tmp_path / "run"))
    res = run_search(cfg).to_json()  # checks cfg: the default strategy's settings filled in
    best = res["best"]
    assert best["budget_met"] and best["latency_ratio"] <= res["budget"]["ratio"]
    assert best["shipped"] in ("search", "start")
    assert (tmp_path / "run" / "best.onnx").is_file() and (tmp_path / "run" / "report.md").is_file()
    assert res["config"]["strategy"] == "knapsack" and res["config"]["trials"] == cfg.trials == 1
    assert len([t for t in res["trials"] if t.get("state") == "complete"]) == cfg.trials
    assert json.loads((tmp_path / "run" / "result.json").read_text())["best"]["widths"] == best["widths"]
