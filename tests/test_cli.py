"""The CLI through typer's CliRunner: JSON shapes, exit codes, one-line errors."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxconet.cli import app
from tests.conftest import TINY

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and "onnxconet" in r.output
    r = invoke("-h")
    assert r.exit_code == 0 and "inspect" in r.output and "prune" in r.output
    r = invoke("prune", "--help")
    assert r.exit_code == 0 and "--ratio" in r.output


def test_inspect_json_describes_groups():
    r = invoke("inspect", TINY, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep) >= {
        "model",
        "input_shape",
        "params",
        "flops",
        "total_channels",
        "prunable_channels",
        "groups",
    }
    assert rep["input_shape"] == [1, 3, 16, 16]
    by_module = {}
    for g in rep["groups"]:
        assert set(g) >= {"id", "channels", "prunable", "reason", "divisor", "members"}
        for m in g["members"]:
            assert m["role"] in ("producer", "consumer", "channelwise")
            by_module.setdefault((m["module"], m["param"], m["axis"]), []).append(g["id"])
    # the residual add ties the stem and conv2 outputs: one group of 8 channels
    stem = by_module[("stem.0", "weight", 0)][0]
    assert by_module[("conv2.0", "weight", 0)] == [stem]
    assert by_module[("head", "weight", 1)] == [stem]
    g = rep["groups"][stem]
    assert g["channels"] == 8 and g["prunable"]
    assert rep["prunable_channels"] == 8 + 12
    inp = [g for g in rep["groups"] if g["reason"] and "graph input" in g["reason"]]
    assert inp and not inp[0]["prunable"]


def test_prune_writes_onnx_that_matches(tmp_path):
    out = tmp_path / "p.onnx"
    r = invoke("prune", TINY, "--ratio", "0.5", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["onnx"] == str(out) and out.exists()
    assert res["params_after"] < res["params_before"] and res["flops_after"] < res["flops_before"]
    assert res["groups_pruned"] == 2 and res["max_abs_diff"] < 1e-4 and res["max_rel_diff"] < 1e-5
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 16, 16), np.float32)})[0]
    assert y.shape == (1, 5)


def test_prune_table_output(tmp_path):
    r = invoke("prune", TINY, "--ratio", "0.25", "--out", str(tmp_path / "t.onnx"))
    assert r.exit_code == 0, r.output
    assert "params" in r.output and "MACs" in r.output and "wrote" in r.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["inspect", "does/not/exist.py:f"], "not found"),
        (["inspect", "/etc/hostname"], "neither an ONNX"),
        (
            ["inspect", str(Path(__file__).parent / "data" / "tiny_models.py") + ":raises"],
            "raised ValueError",
        ),
        (
            ["inspect", str(Path(__file__).parent / "data" / "tiny_models.py") + ":not_a_module"],
            "not a torch.nn.Module",
        ),
        (["inspect", "torchvision:resnet_nope"], "unknown torchvision model"),
        (["inspect", "nonsense"], "unknown model spec"),
        (["inspect", TINY, "--input-shape", "1,4,16,16"], "does not run on input shape"),
        (["inspect", TINY, "--input-shape", "1,x"], "not a list of integers"),
        (["prune", TINY, "--ratio", "1.0"], "outside [0, 1)"),
        (["prune", TINY, "--ratio", "-0.1"], "outside [0, 1)"),
        (["inspect", TINY, "--weights", "missing.pt"], "file not found"),
    ],
)
def test_bad_input_is_one_line_exit_1(args, needle):
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    msg = r.stderr.strip() if r.stderr else r.output.strip()
    assert needle in msg
    assert "Traceback" not in r.output
    assert len([ln for ln in msg.splitlines() if ln.strip()]) == 1


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    r = invoke("inspect", str(bad))
    assert r.exit_code == 1 and "bad.onnx" in r.stderr


def test_weights_loaded_safely(tmp_path):
    import torch

    from tests.data.tiny_models import tiny_res

    good = tmp_path / "w.pt"
    torch.save(tiny_res().state_dict(), good)
    assert invoke("inspect", TINY, "--weights", str(good), "--json").exit_code == 0
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo": torch.zeros(3)}, wrong)
    r = invoke("inspect", TINY, "--weights", str(wrong))
    assert r.exit_code == 1 and "does not fit" in r.stderr

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    r = invoke("inspect", TINY, "--weights", str(evil))
    assert r.exit_code == 1 and "refused" in r.stderr and "pwned" not in r.output  # tests/test_weights.py


def test_inspect_onnx_file_and_usage_error(tmp_path):
    out = tmp_path / "m.onnx"
    assert invoke("prune", TINY, "--ratio", "0", "--out", str(out)).exit_code == 0
    r = invoke("inspect", str(out), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["prunable_channels"] == 20
    assert invoke("prune", "--bogus").exit_code == 2


def test_prune_freezes_a_group_that_breaks_torch(tmp_path):
    """models whose forward() hard-codes a channel count: the surgery check freezes that group."""
    spec = str(Path(__file__).parent / "data" / "tiny_models.py") + ":hardcoded"
    r = invoke("prune", spec, "--ratio", "0.5", "--out", str(tmp_path / "h.onnx"), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["groups_frozen"] == 1 and res["groups_pruned"] == 1
    assert res["max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    "args,expected",
    [
        # the default: the knapsack as benched (loss path, removable branches, one trial, the epochs moved to the
        # final fine-tune)
        ([], dict(strategy="knapsack", importance="path", depth=True, trials=1, final_epochs=15)),
        (["--strategy", "anneal"], dict(start="uniform", importance="taylor", depth=False, trials=12, final_epochs=4)),
        (["--strategy", "dmasking"], dict(depth=False, trials=12, final_epochs=4)),
        (["--strategy", "l1", "--depth"], dict(depth=True, trials=1, final_epochs=15)),  # placed as deployed
        (["--strategy", "random"], dict(trials=12, final_epochs=4)),
        # what the user says wins over the strategy's default
        (["--no-depth", "--importance", "loss", "--trials", "3", "--final-epochs", "2", "--start", "smallest"],
         dict(strategy="knapsack", importance="loss", depth=False, trials=3, final_epochs=2, start="smallest")),
    ],
)  # fmt: skip
def test_search_defaults_are_the_strategys(monkeypatch, args, expected):
    """Options the user leaves out take the strategy's defaults (`config.strategy_defaults`), and the run gets
    a checked config holding them (recorded in result.json as they were used)."""
    import onnxconet.commands.search as commands

    seen = []

    def fake_run(cfg, progress=None):
        cfg.check()
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(commands, "run_search", fake_run)
    r = CliRunner().invoke(app, ["search", *args])
    assert r.exit_code == 0, r.output
    assert {k: getattr(seen[0], k) for k in expected} == expected


def test_search_help_names_the_default_strategy():
    r = CliRunner().invoke(app, ["search", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "knapsack (the default:" in text and "--no-depth" in text
