"""onnxruntime timing: stats, stopping rule, interleaved ratios, provider fallback, input feed errors."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxconet.errors import LatencyError
from onnxconet.latency.profile import (
    CPU,
    LatencyStats,
    Runner,
    Target,
    make_session,
    measure,
    measure_relative,
    median_ci,
    physical_cores,
)

QUICK = {"warmup": 3, "min_runs": 20, "max_seconds": 0.5}


def cnn(width: int = 8, layers: int = 1, batch: int | str = 1, hw: int | str = 16) -> onnx.ModelProto:
    """Conv 3->width 3x3 (+ layers-1 Conv width->width) + Relu + GlobalAveragePool + Flatten + Gemm -> 10."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        cin = 3 if i == 0 else width
        w = rng.standard_normal((width, cin, 3, 3)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((10, width)).astype(np.float32), "fc.weight"))
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


SMALL = cnn().SerializeToString()
LARGE = cnn(width=48, layers=3).SerializeToString()  # ~100x the MACs of SMALL


def _cuda_loads() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        session, _ = make_session(SMALL, Target(provider="cuda"))
    except LatencyError:
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


CUDA_LOADS = _cuda_loads()
needs_no_cuda = pytest.mark.skipif(CUDA_LOADS, reason="a CUDA provider really loads here")
needs_cuda = pytest.mark.skipif(not CUDA_LOADS, reason="no CUDA provider loads here")


def test_measure_stats_well_formed():
    stats = measure(SMALL, Target(provider="cpu", threads=1), **QUICK)
    assert isinstance(stats, LatencyStats)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0
    assert stats.runs >= 20
    assert stats.provider == CPU and stats.requested == "cpu" and stats.fallback is None
    assert stats.threads == 1 and stats.batch == 1 and stats.input_shape == (1, 3, 16, 16)
    assert stats.onnxruntime == ort.__version__
    d = stats.to_dict()
    assert d["input_shape"] == [1, 3, 16, 16] and LatencyStats.from_dict(d) == stats


def test_threads_zero_means_physical_cores():
    stats = measure(SMALL, Target(provider="cpu"), **QUICK)
    assert stats.threads == physical_cores() >= 1


def test_measure_stops_at_max_seconds():
    t0 = time.perf_counter()
    stats = measure(LARGE, Target(provider="cpu"), warmup=2, rel_ci=1e-9, max_runs=10**9, max_seconds=0.4)
    elapsed = time.perf_counter() - t0
    assert stats.runs >= 1
    assert elapsed < 0.4 + 1.5  # + session creation and one run, on a loaded machine


def test_measure_stops_at_max_runs():
    stats = measure(SMALL, Target(provider="cpu"), warmup=1, min_runs=5, max_runs=25, rel_ci=1e-9)
    assert stats.runs == 25


def test_median_ci_order_statistics():
    x = np.arange(1.0, 101.0)  # n=100: ranks 40 and 61 (1-based), as in the tables
    med, lo, hi = median_ci(np.random.default_rng(0).permutation(x))
    assert med == 50.5 and lo == 40.0 and hi == 61.0
    med, lo, hi = median_ci([3.0, 1.0, 2.0])  # too few samples: the full range
    assert (med, lo, hi) == (2.0, 1.0, 3.0)


def test_relative_larger_model_is_slower():
    rel = measure_relative(LARGE, SMALL, Target(provider="cpu"), warmup=3, max_seconds=1.0)
    assert rel.ratio > 1 and rel.paired_ratio > 1
    assert rel.ratio_p10 <= rel.paired_ratio <= rel.ratio_p90
    assert rel.rounds >= 1 and rel.candidate.runs == rel.reference.runs == rel.rounds
    assert rel.candidate.median_ms > rel.reference.median_ms
    assert rel.to_dict()["candidate"]["provider"] == CPU


def test_relative_ratio_survives_preemption(monkeypatch):
    """On a shared machine runs are either undisturbed or preempted (+ a scheduler slice). Here the reference
    is preempted in 70 % of its runs, the candidate in 20 %: the median of per-round ratios is far off (the
    estimator this replaced), the ratio of 10th percentiles recovers the true 0.5."""
    import onnxconet.latency.profile as prof

    rng = np.random.default_rng(0)

    class FakeRunner:
        provider, fallback, threads, input_shape = CPU, None, 1, (1, 3, 16, 16)

        def __init__(self, model, target, spin=True):
            self.target = target
            self.base, self.hit = (1e-3, 0.2) if model == "cand" else (2e-3, 0.7)

        def run_once(self):
            t = self.base * rng.uniform(1.0, 1.03)
            return t + (8e-3 if rng.random() < self.hit else 0.0)

    monkeypatch.setattr(prof, "Runner", FakeRunner)
    rel = prof.measure_relative(
        "cand", "ref", Target(provider="cpu"), warmup=1, max_rounds=400, max_seconds=5
    )
    assert rel.paired_ratio < 0.3  # mostly rounds where only the reference was preempted
    assert abs(rel.ratio - 0.5) < 0.03


def test_relative_model_against_itself_is_about_one():
    rel = measure_relative(LARGE, LARGE, Target(provider="cpu"), warmup=3, max_seconds=1.0)
    assert 0.7 < rel.ratio < 1.4


def test_model_from_path_and_proto(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(SMALL)
    assert measure(path, Target(provider="cpu"), **QUICK).runs >= 20
    assert measure(str(path), Target(provider="cpu"), **QUICK).runs >= 20
    assert measure(cnn(), Target(provider="cpu"), **QUICK).runs >= 20


def test_model_with_external_data_opens_from_path(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(cnn(width=16), path, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    assert measure(path, Target(provider="cpu"), **QUICK).runs >= 20


@needs_no_cuda
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_falls_back_to_cpu(provider, caplog):
    with caplog.at_level(logging.WARNING, logger="onnxconet.latency.profile"):
        stats = measure(SMALL, Target(provider=provider), **QUICK)
    assert stats.provider == CPU and stats.requested == provider
    assert stats.fallback and provider in stats.fallback and CPU in stats.fallback
    assert any(provider in r.getMessage() for r in caplog.records)


@needs_no_cuda
def test_gpu_provider_strict_raises():
    with pytest.raises(LatencyError, match=r"cuda.*did not load.*CPUExecutionProvider"):
        make_session(SMALL, Target(provider="cuda", strict=True))


def test_auto_never_warns_and_strict_auto_never_raises():
    session, fallback = make_session(SMALL, Target(provider="auto", strict=True))
    assert fallback is None and session.get_providers()[0] in ort.get_available_providers()


def test_batch_mismatch_raises():
    with pytest.raises(LatencyError, match="exported with batch 1"):
        Runner(SMALL, Target(provider="cpu", batch=4))


def test_symbolic_batch_uses_target_batch():
    runner = Runner(cnn(batch="N").SerializeToString(), Target(provider="cpu", batch=3))
    assert runner.input_shape == (3, 3, 16, 16)
    assert runner.run_once() > 0


def test_symbolic_spatial_dims_need_input_shape():
    model = cnn(batch="N", hw="H").SerializeToString()
    with pytest.raises(LatencyError, match="symbolic dims"):
        Runner(model, Target(provider="cpu"))
    runner = Runner(model, Target(provider="cpu", batch=2, input_shape=(1, 3, 24, 24)))
    assert runner.input_shape == (2, 3, 24, 24)  # batch entry replaced by target.batch
    with pytest.raises(LatencyError, match="does not fit"):
        Runner(SMALL, Target(provider="cpu", input_shape=(1, 3, 32, 32)))


def test_corrupt_model_raises(tmp_path):
    with pytest.raises(LatencyError, match=r"<bytes>"):
        measure(b"not an onnx model", Target(provider="cpu"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(LatencyError, match="bad.onnx"):
        make_session(bad, Target())
    with pytest.raises(LatencyError, match="not found"):
        make_session(tmp_path / "missing.onnx", Target())


def test_bad_target_raises():
    with pytest.raises(LatencyError, match="unknown provider"):
        Target(provider="rocm")
    with pytest.raises(LatencyError):
        Target(batch=0)
    assert Target(input_shape=[1, 3, 8, 8]).input_shape == (1, 3, 8, 8)


@pytest.mark.gpu
@needs_cuda
def test_cuda_runner_uses_iobinding():
    runner = Runner(LARGE, Target(provider="cuda", strict=True))
    assert runner.provider == "CUDAExecutionProvider" and runner._binding is not None
    assert runner.run_once() > 0
    stats = measure(LARGE, Target(provider="cuda", strict=True), **QUICK)
    assert stats.provider == "CUDAExecutionProvider" and stats.fallback is None


@pytest.mark.gpu
@needs_cuda
def test_tensorrt_engine_cache_dir(tmp_path):
    target = Target(provider="tensorrt", trt_cache_dir=str(tmp_path / "trt"))
    stats = measure(LARGE, target, **QUICK)
    if stats.provider != "TensorrtExecutionProvider":
        pytest.skip(f"TensorRT does not load here: {stats.fallback}")
    assert any((tmp_path / "trt").iterdir())
