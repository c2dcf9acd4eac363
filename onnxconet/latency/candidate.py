"""One candidate, measured: widths -> sliced ONNX -> latency relative to the full-width reference.

This is what the search calls for every candidate it wants measured. The candidate is cut from the exported
graph (`slice_onnx`, milliseconds; no torch re-export), timed against the reference the in-loop way
(`PairedMeasurer`: two runner processes taking turns, an estimate of the ratio as deployed), and reported with
its FLOPs and params so every result can state its realized speedup next to its FLOPs reduction.

Cache: a `LatencyCache` holds three lines per measured candidate, all keyed by the candidate's graph hash, the
target and the method (`LatencyCache.key`) plus ``"relative_to"`` (the reference's graph hash): the candidate's
stats from the paired run, the reference's stats from it (key on the reference's hash, ``"relative_to"`` the
candidate's), and the ratio statistics under ``"quantity": "ratio"`` (in that line the ``*_ms`` fields hold
dimensionless ratios: the median field the ratio, the percentile fields those of the per-round ratios). A
repeated query returns the same numbers at once. A disturbed measurement (other programs took the cores) is
not cached.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import onnx
import onnxruntime as ort

from onnxconet.errors import LatencyError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.latency.cache import LatencyCache, graph_hash
from onnxconet.latency.profile import (
    PAIRED,
    LatencyStats,
    ModelLike,
    PairedMeasurer,
    Target,
    measure_relative,
)
from onnxconet.surgery.onnx import slice_onnx

log = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1
# per channel graph: (L1 scores, full FLOPs, full params); computed once
_graph_info: WeakKeyDictionary[ChannelGraph, tuple[np.ndarray, int, int]] = WeakKeyDictionary()
# reference models already serialized and hashed, by identity (holding the object keeps its id unique)
_refs: OrderedDict[int, tuple[Any, bytes | str, str]] = OrderedDict()


def graph_info(cg: ChannelGraph) -> tuple[np.ndarray, int, int]:
    """(per-bundle L1 scores, full-width FLOPs, full-width params) of `cg`, computed once per graph."""
    info = _graph_info.get(cg)
    if info is None:
        info = (cg.l1_scores(), count_flops(cg), count_params(cg))
        _graph_info[cg] = info
    return info


def reference_source(reference: ModelLike) -> tuple[bytes | str, str]:
    """What onnxruntime opens for the reference (bytes, or a path for files) and its graph hash; memoized."""
    hit = _refs.get(id(reference))
    if hit is not None and hit[0] is reference:
        _refs.move_to_end(id(reference))
        return hit[1], hit[2]
    if isinstance(reference, onnx.ModelProto):
        if reference.ByteSize() >= _PROTO_LIMIT:
            raise LatencyError("reference model is > 2 GB; save it with external data and pass the file path")
        src: bytes | str = reference.SerializeToString()
    elif isinstance(reference, (str, os.PathLike)):
        src = os.fspath(reference)
        if not os.path.isfile(src):
            raise LatencyError(f"reference model {src} not found")
    elif isinstance(reference, (bytes, bytearray, memoryview)):
        src = bytes(reference)
    else:
        raise LatencyError(f"cannot time a reference given as {type(reference).__name__}")
    h = graph_hash(src)
    _refs[id(reference)] = (reference, src, h)
    while len(_refs) > 4:
        _refs.popitem(last=False)
    return src, h


def _rel_keys(cand_hash: str, ref_hash: str, target: Target, shape: Any) -> tuple[dict, dict, dict]:
    base_c = LatencyCache.key(cand_hash, target, shape, target.provider, PAIRED)
    base_r = LatencyCache.key(ref_hash, target, shape, target.provider, PAIRED)
    return (
        base_c | {"relative_to": ref_hash},
        base_r | {"relative_to": cand_hash},
        base_c | {"relative_to": ref_hash, "quantity": "ratio"},
    )


def measure_candidate(
    cg: ChannelGraph,
    widths: Mapping[int, int],
    reference_onnx: ModelLike,
    target: Target,
    cache: LatencyCache | None = None,
    *,
    scores: np.ndarray | None = None,
    measurer: PairedMeasurer | None = None,
    **timing: Any,
) -> dict:
    """Slice `cg`'s model to `widths` and time it against the full-width reference (the in-loop measurement).

    Args:
        cg: channel graph of the exported model (its batch must be `target.batch`).
        widths: group id -> channels (groups not listed stay at full width).
        reference_onnx: the full-width model (ModelProto, bytes or path); serialized and hashed once.
        target: provider, threads, batch.
        cache: a `LatencyCache`; a candidate measured before on the same target is not timed again.
        scores: per-bundle scores choosing which channels stay (default: L1 norm of the producers).
        measurer: a `PairedMeasurer` holding `reference_onnx` (saves starting runners for every candidate);
            None starts a fresh pair.
        **timing: min_rounds, max_rounds, max_seconds, rel_ci of `PairedMeasurer.compare`.

    Returns:
        ``{"widths", "latency_ms", "reference_ms", "ratio", "ratio_p10", "ratio_p90", "speedup", "flops",
        "params", "flops_ratio", "params_ratio", "provider", "fallback", "threads", "batch", "onnxruntime",
        "rounds", "slice_seconds", "measure_seconds", "cached", "graph_hash", "load", "disturbed"}``: median
        latency in ms of the candidate and the reference from the paired run, ratio = candidate / reference
        (`PairedMeasurer.compare`), speedup = 1 / ratio.

    Raises:
        SurgeryError: widths outside the groups' ranges. LatencyError: a model does not load, the provider
        is unavailable under `target.strict`, or the batch does not match the export.
    """
    t0 = time.perf_counter()
    full_scores, flops0, params0 = graph_info(cg)
    keep = cg.keep_mask(widths, full_scores if scores is None else scores)
    flops, params = count_flops(cg, keep), count_params(cg, keep)
    with _serialized(slice_onnx(cg, keep)) as cand_src:
        cand_hash = graph_hash(cand_src)
        slice_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        m = _timed(cand_src, cand_hash, reference_onnx, target, cache, measurer, timing)
        measure_s = time.perf_counter() - t1
    cs, rs, r = m["candidate"], m["reference"], m["ratio"]
    return {
        "widths": {str(k): int(v) for k, v in sorted(widths.items())},
        "latency_ms": cs.median_ms,
        "reference_ms": rs.median_ms,
        "ratio": r.median_ms,
        "ratio_p10": r.p10_ms,
        "ratio_p90": r.p90_ms,
        "speedup": 1.0 / r.median_ms if r.median_ms > 0 else float("inf"),
        "flops": flops,
        "params": params,
        "flops_ratio": flops / flops0 if flops0 else 1.0,
        "params_ratio": params / params0 if params0 else 1.0,
        "provider": cs.provider,
        "fallback": cs.fallback,
        "threads": cs.threads,
        "batch": cs.batch,
        "onnxruntime": cs.onnxruntime,
        "rounds": r.runs,
        "slice_seconds": slice_s,
        "measure_seconds": measure_s,
        "cached": m["cached"],
        "graph_hash": cand_hash,
        "load": m["load"],
        "disturbed": m["disturbed"],
    }


@contextmanager
def _serialized(model: onnx.ModelProto):
    """What onnxruntime opens for a sliced candidate: bytes, or (> 2 GB, which protobuf cannot serialize) a
    temporary file with its weights as external data next to it."""
    if model.ByteSize() < _PROTO_LIMIT:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxconet-cand-") as tmp:
        path = os.path.join(tmp, "candidate.onnx")
        onnx.save(model, path, save_as_external_data=True, location="candidate.onnx.data")
        del model
        yield path


def _timed(cand_src, cand_hash: str, reference_onnx, target: Target, cache, measurer, timing: dict) -> dict:
    """The candidate's and the reference's stats and the ratio statistics (a `LatencyStats` whose *_ms fields
    hold ratios), from the cache or measured (a disturbed measurement is not cached)."""
    ref_src, ref_hash = reference_source(reference_onnx)
    shape = None if target.input_shape is None else (target.batch, *target.input_shape[1:])
    keys = _rel_keys(cand_hash, ref_hash, target, shape)
    got = [cache.get(k) for k in keys] if cache is not None else [None]
    if all(g is not None for g in got):
        cs, rs, ratio = got
        if target.strict and cs.fallback:
            raise LatencyError(
                f"cached measurement fell back ({cs.fallback}); drop strict or fix the provider"
            )
        log.debug("latency cache hit for candidate %s: ratio %.4f", cand_hash[:12], ratio.median_ms)
        return {
            "candidate": cs,
            "reference": rs,
            "ratio": ratio,
            "cached": True,
            "load": None,
            "disturbed": False,
        }
    if measurer is not None:
        rel = measurer.compare(cand_src, **timing)
    else:
        rel = measure_relative(cand_src, ref_src, target, **timing)
    ratio = _ratio_stats(rel.ratio, rel.ratio_p10, rel.ratio_p90, rel.rounds, rel.candidate)
    if cache is not None and not rel.disturbed:
        for key, stats in zip(keys, (rel.candidate, rel.reference, ratio), strict=True):
            cache.put(key, stats)
    return {
        "candidate": rel.candidate, "reference": rel.reference, "ratio": ratio, "cached": False,
        "load": rel.load, "disturbed": rel.disturbed,
    }  # fmt: skip


def _ratio_stats(ratio: float, p10: float, p90: float, rounds: int, like: LatencyStats) -> LatencyStats:
    """Per-round ratio statistics in a LatencyStats container (the *_ms fields hold ratios)."""
    return LatencyStats(
        median_ms=ratio,
        p10_ms=p10,
        p90_ms=p90,
        mean_ms=ratio,
        std_ms=0.0,
        runs=rounds,
        provider=like.provider,
        requested=like.requested,
        fallback=like.fallback,
        threads=like.threads,
        batch=like.batch,
        input_shape=like.input_shape,
        onnxruntime=ort.__version__,
    )
