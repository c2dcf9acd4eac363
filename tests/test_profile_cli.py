"""`onnxconet profile` through typer's CliRunner: JSON keys, --compare, --widths, --batch, provider fallback and
--strict, one-line errors."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from onnxconet.cli import app
from onnxconet.errors import LatencyError
from onnxconet.latency.profile import Target, make_session
from onnxconet.prepare import prepare
from onnxconet.space import save_widths
from tests.conftest import MIX, TINY

QUICK = ["--seconds", "0.2", "--threads", "1"]
KEYS = {
    "provider",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "mean_ms",
    "std_ms",
    "runs",
    "threads",
    "batch",
    "onnxruntime",
}
KEYS |= {"flops", "params", "fallback"}
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["profile", *args])


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(tiny.onnx_model, str(path))
    return str(path)


def _cuda_loads(model: bytes) -> bool:
    try:
        session, _ = make_session(model, Target(provider="cuda"))
    except LatencyError:
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


def test_json_of_a_model_spec(tiny):
    r = invoke(TINY, "--provider", "cpu", "--json", *QUICK)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res) >= KEYS
    assert res["provider"] == "CPUExecutionProvider" and res["fallback"] is None
    assert res["threads"] == 1 and res["batch"] == 1 and res["input_shape"] == [1, 3, 16, 16]
    assert res["p10_ms"] <= res["median_ms"] <= res["p90_ms"] and res["runs"] >= 1
    assert res["flops"] > 0 and res["params"] > 0
    assert "ratio" not in res


def test_table_output_and_onnx_file(tiny_onnx):
    r = invoke(tiny_onnx, "--provider", "cpu", *QUICK)
    assert r.exit_code == 0, r.output
    assert "median" in r.stdout and "CPUExecutionProvider" in r.stdout and "MACs" in r.stdout


def test_compare_reports_an_in_loop_ratio(tiny_onnx):
    r = invoke(TINY, "--provider", "cpu", "--compare", tiny_onnx, "--json", *QUICK)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"ratio", "ratio_p10", "ratio_p90", "compare", "method", "ratios", "load", "disturbed"} <= set(res)
    assert res["method"] == "paired-processes-abba" and len(res["ratios"]) == res["compare"]["rounds"] >= 3
    assert 0.3 < res["ratio"] < 3  # the same graph on both sides
    assert res["compare"]["target"] == tiny_onnx and res["compare"]["flops"] == res["flops"]
    r = invoke(TINY, "--provider", "cpu", "--compare", TINY, *QUICK)  # same spec: exported once
    assert r.exit_code == 0, r.output
    assert "latency ratio" in r.stdout


def test_compare_isolated_is_the_deployed_ratio(tiny_onnx):
    r = invoke(
        TINY, "--provider", "cpu", "--compare", tiny_onnx, "--isolated", "--pairs", "2", "--json", *QUICK
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["method"] == "isolated-processes" and len(res["ratios"]) == res["compare"]["rounds"] == 2
    assert 0.3 < res["ratio"] < 3
    r = invoke(TINY, "--provider", "cpu", "--compare", tiny_onnx, "--isolated", "--pairs", "1", *QUICK)
    assert r.exit_code == 0 and "as deployed, 1 process pairs" in r.stdout


def test_ort_config_is_stated_and_checked():
    r = invoke(
        TINY, "--provider", "cpu", "--ort-config", "session.intra_op.allow_spinning=0", "--json", *QUICK
    )
    assert r.exit_code == 0, r.output
    assert "allow_spinning=0" in json.loads(r.stdout)["session"]
    r = invoke(TINY, "--ort-config", "nonsense", *QUICK)
    assert r.exit_code == 1 and "KEY=VALUE" in r.output and "Traceback" not in r.output


def test_widths_file_slices_the_model(tiny, tmp_path):
    cg = tiny.graph
    path = tmp_path / "w.json"
    save_widths(path, {gid: max(1, c // 2) for gid, c in cg.full_widths().items()}, cg, TINY)
    r = invoke(TINY, "--widths", str(path), "--compare", TINY, "--provider", "cpu", "--json", *QUICK)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["widths"] == str(path)
    assert res["flops"] < res["compare"]["flops"] and res["params"] < res["compare"]["params"]


def test_widths_file_of_another_model_is_refused(tmp_path):
    mix = prepare(MIX)
    path = tmp_path / "mix.json"
    save_widths(path, mix.graph.full_widths(), mix.graph, MIX)
    r = invoke(TINY, "--widths", str(path), *QUICK)
    assert r.exit_code == 1
    assert "another model" in r.output and "Traceback" not in r.output


def test_batch_exports_the_spec_and_mismatches_are_errors(tiny_onnx):
    r = invoke(TINY, "--batch", "2", "--provider", "cpu", "--json", *QUICK)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["batch"] == 2 and res["input_shape"] == [2, 3, 16, 16]
    r = invoke(tiny_onnx, "--batch", "2", *QUICK)  # the file was exported with batch 1
    assert r.exit_code == 1 and "batch 1" in r.output and "batch 2" in r.output
    r = invoke(TINY, "--batch", "4", "--input-shape", "2,3,16,16", *QUICK)
    assert r.exit_code == 1 and "batch mismatch" in r.output


def test_errors_are_one_line(tmp_path):
    for args, text in [
        ((str(tmp_path / "missing.onnx"),), "not found"),
        ((TINY, "--provider", "gpu"), "unknown provider"),
        ((TINY, "--widths", str(tmp_path / "nope.json")), "not found"),
    ]:
        r = invoke(*args, *QUICK)
        assert r.exit_code == 1, (args, r.output)
        assert text in r.output and "Traceback" not in r.output
        assert len([ln for ln in r.output.splitlines() if ln.startswith("error")]) == 1


def test_cuda_fallback_is_visible_and_strict_fails(tiny):
    if _cuda_loads(tiny.onnx_model.SerializeToString()):
        pytest.skip("a CUDA provider really loads here")
    r = invoke(TINY, "--provider", "cuda", "--json", *QUICK)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["provider"] == "CPUExecutionProvider" and res["requested"] == "cuda"
    assert res["fallback"] and "cuda" in res["fallback"]
    r = invoke(TINY, "--provider", "cuda", *QUICK)
    assert r.exit_code == 0 and "warning" in r.stdout and "CPUExecutionProvider" in r.stdout
    r = invoke(TINY, "--provider", "cuda", "--strict", *QUICK)
    assert r.exit_code == 1 and "did not load" in r.output


@pytest.mark.gpu
def test_cuda_really_measures_on_cuda(tiny):
    if not _cuda_loads(tiny.onnx_model.SerializeToString()):
        pytest.skip("no CUDA provider loads here")
    r = invoke(TINY, "--provider", "cuda", "--strict", "--json", "--seconds", "0.5")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["provider"] == "CUDAExecutionProvider" and res["fallback"] is None
