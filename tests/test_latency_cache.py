"""Latency cache: graph hash, JSONL round trip, key sensitivity, corrupt lines, cached_measure."""

from __future__ import annotations

import json
import logging

import onnx
import pytest

import onnxconet.latency.cache as cache_mod
from onnxconet.errors import LatencyError
from onnxconet.latency.cache import LatencyCache, cached_measure, graph_hash
from onnxconet.latency.profile import LatencyStats, Target
from tests.onnx_builders import small_cnn

cnn = small_cnn


def fake_stats(median: float = 1.0, **kw) -> LatencyStats:
    d = {
        "median_ms": median,
        "p10_ms": median * 0.9,
        "p90_ms": median * 1.1,
        "mean_ms": median,
        "std_ms": 0.05,
        "runs": 20,
        "provider": "CPUExecutionProvider",
        "requested": "cpu",
        "fallback": None,
        "threads": 1,
        "batch": 1,
        "input_shape": (1, 3, 16, 16),
        "onnxruntime": "1.0",
    }
    return LatencyStats(**(d | kw))


def key(h: str = "abc", **target_kw) -> dict:
    target = Target(**({"provider": "cpu", "threads": 1} | target_kw))
    return LatencyCache.key(h, target, target.input_shape, target.provider)


def test_graph_hash_stable_and_sensitive(tmp_path):
    a = cnn().SerializeToString()
    assert graph_hash(a) == graph_hash(cnn().SerializeToString())
    assert len(graph_hash(a)) == 64
    assert graph_hash(cnn(seed=1).SerializeToString()) != graph_hash(a)  # one weight tensor changed
    assert graph_hash(cnn(width=9).SerializeToString()) != graph_hash(a)
    assert graph_hash(cnn()) == graph_hash(cnn())  # ModelProto
    path = tmp_path / "m.onnx"
    path.write_bytes(a)
    assert graph_hash(path) == graph_hash(str(path)) == graph_hash(a)


def test_graph_hash_covers_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(cnn(), path, save_as_external_data=True, location="ext.data", size_threshold=0)
    h = graph_hash(path)
    assert h == graph_hash(path)
    data = bytearray((tmp_path / "ext.data").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "ext.data").write_bytes(bytes(data))
    assert graph_hash(path) != h
    (tmp_path / "ext.data").unlink()
    with pytest.raises(LatencyError, match="ext"):
        graph_hash(path)


def test_put_get_round_trip_and_reload(tmp_path):
    path = tmp_path / "deep" / "dir" / "lat.jsonl"
    cache = LatencyCache(path)
    assert not path.parent.exists()  # created lazily
    assert cache.get(key()) is None
    cache.put(key(), fake_stats(2.0))
    assert cache.get(key()) == fake_stats(2.0)
    assert LatencyCache(path).get(key()) == fake_stats(2.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and set(json.loads(lines[0])) == {"key", "stats"}


@pytest.mark.parametrize(
    "changed",
    [{"h": "other"}, {"threads": 2}, {"provider": "cuda"}, {"input_shape": (1, 3, 32, 32)}, {"batch": 2}],
)
def test_changed_key_misses(tmp_path, changed):
    cache = LatencyCache(tmp_path / "lat.jsonl")
    cache.put(key(), fake_stats())
    assert cache.get(key(**changed)) is None
    assert LatencyCache(tmp_path / "lat.jsonl").get(key(**changed)) is None


def test_key_has_version_and_host():
    k = key()
    assert k["onnxruntime"] and k["host"] and k["threads"] == 1 and k["input_shape"] is None


def test_corrupt_lines_skipped_and_later_line_wins(tmp_path, caplog):
    path = tmp_path / "lat.jsonl"
    good = json.dumps({"key": key(), "stats": fake_stats(1.0).to_dict()})
    newer = json.dumps({"key": key(), "stats": fake_stats(3.0).to_dict()})
    missing = json.dumps({"key": key("x"), "stats": {"median_ms": 1.0}})
    path.write_text("\n".join([good, "{not json", missing, "", newer, '["list"]']) + "\n")
    with caplog.at_level(logging.WARNING, logger="onnxconet.latency.cache"):
        cache = LatencyCache(path)
        assert cache.get(key()) == fake_stats(3.0)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3
    assert any(f"{path}:2:" in w for w in warned) and any(f"{path}:3:" in w for w in warned)
    assert any(f"{path}:6:" in w for w in warned)
    assert len(cache) == 1


def test_put_after_truncated_line_starts_a_new_line(tmp_path):
    path = tmp_path / "lat.jsonl"
    path.write_text('{"key": {"graph": "half-writ')  # process killed mid-write
    cache = LatencyCache(path)
    cache.put(key(), fake_stats())
    assert LatencyCache(path).get(key()) == fake_stats()


def test_cached_measure_miss_then_hit(tmp_path, monkeypatch):
    model = cnn().SerializeToString()
    cache = LatencyCache(tmp_path / "lat.jsonl")
    target = Target(provider="cpu", threads=1)
    first = cached_measure(model, target, cache, warmup=1, min_runs=5, max_seconds=0.3)
    assert first.runs >= 5 and len((tmp_path / "lat.jsonl").read_text().splitlines()) == 1

    def no_measure(*a, **kw):
        raise AssertionError("a cache hit must not measure")

    monkeypatch.setattr(cache_mod, "measure", no_measure)
    assert cached_measure(model, target, cache) == first
    assert cached_measure(model, target, LatencyCache(tmp_path / "lat.jsonl")) == first
    with pytest.raises(AssertionError):
        cached_measure(model, Target(provider="cpu", threads=2), cache)  # other key: measures


def test_cached_measure_without_cache_measures():
    stats = cached_measure(cnn().SerializeToString(), Target(provider="cpu"), None, max_seconds=0.3)
    assert stats.runs >= 1


def test_cached_fallback_raises_under_strict(tmp_path):
    model = cnn().SerializeToString()
    cache = LatencyCache(tmp_path / "lat.jsonl")
    target = Target(provider="cuda", threads=1)
    k = LatencyCache.key(graph_hash(model), target, None, "cuda")
    cache.put(k, fake_stats(fallback="asked for cuda but measuring on CPUExecutionProvider"))
    assert cached_measure(model, target, cache).fallback
    with pytest.raises(LatencyError, match="fell back"):
        cached_measure(model, Target(provider="cuda", threads=1, strict=True), cache)
