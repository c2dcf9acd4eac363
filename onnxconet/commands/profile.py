"""`onnxconet profile`: latency of a model (or of a pruned candidate) measured with onnxruntime.

TARGET is an ONNX file (timed as it is, from its path) or a model spec (exported once at the asked batch and
input shape; sliced to a widths file first when one is given). It is timed alone in a fresh runner process with
onnxruntime's default session options, as a deployment runs it. With `compare`, the ratio target / other is
reported too: by default the in-loop way the search measures every candidate (two runner processes taking
turns), with `isolated` as deployed (each model alone in fresh processes, `pairs` pairs alternated).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onnxconet.errors import InputShapeError, LatencyError, ModelSpecError, OnnxconetError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.latency.profile import CPU, CUDA, TRT, Target, measure, measure_isolated, measure_relative

log = logging.getLogger(__name__)

_PROVIDER_NAMES = {CPU: "cpu", CUDA: "cuda", TRT: "tensorrt"}


@dataclass
class _Timed:
    """A model ready to time: what onnxruntime opens, its FLOPs/params, and the input shape it runs on."""

    spec: str
    source: bytes | str
    flops: int | None
    params: int | None
    input_shape: tuple[int, ...] | None
    cg: ChannelGraph | None = None
    full: bytes | None = None  # the unsliced export of a model spec (compare reuses it for the same spec)
    note: str | None = None  # why FLOPs/params are missing: a warning, shown only when the timing works


def _is_onnx(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def _batch_shape(
    spec: str, batch: int | None, input_shape: tuple[int, ...] | None
) -> tuple[int, tuple | None]:
    """The batch to time and the input shape to export with (None: the spec's own, batch replaced)."""
    if input_shape is not None and batch is not None and input_shape[0] != batch:
        raise InputShapeError(
            f"batch mismatch: --input-shape has batch {input_shape[0]} but --batch is {batch}; drop one of them"
        )
    b = batch if batch is not None else (input_shape[0] if input_shape is not None else 1)
    if b < 1:
        raise InputShapeError(f"--batch {b} must be >= 1")
    return b, input_shape


def _graph_counts(cg: ChannelGraph, keep=None) -> tuple[int | None, int | None]:
    return count_flops(cg, keep), count_params(cg, keep)


def _load(
    spec: str,
    *,
    weights: str | None,
    batch: int,
    input_shape: tuple[int, ...] | None,
    widths: str | None,
    status: Callable[[str], None],
) -> _Timed:
    from onnxconet.prepare import prepare

    if _is_onnx(spec):
        path = Path(spec)
        if not path.is_file():
            raise ModelSpecError(f"{spec}: file not found")
        if weights:
            raise ModelSpecError(f"--weights applies to torch models, not to the ONNX file {spec}")
        if widths is None:
            from onnxconet.graph.ir import load_onnx

            model = load_onnx(str(path))  # a file onnx cannot read, onnxruntime cannot either: one error
            flops = params = None
            note = None
            try:  # FLOPs/params need the channel graph; timing does not
                cg = ChannelGraph(model, spec)
                flops, params = _graph_counts(cg)
            except OnnxconetError as e:
                note = f"{spec}: FLOPs and params not counted ({e})"  # warned once the timing succeeded
            return _Timed(spec, str(path), flops, params, input_shape, note=note)
        status(f"reading the channel groups of {spec}…")
        prep = prepare(spec)
    else:
        shape = None
        if input_shape is not None:
            shape = (batch, *input_shape[1:])
        elif batch != 1:
            from onnxconet.load import load_model

            shape = (batch, *load_model(spec).input_shape[1:])
        status(f"exporting {spec} to ONNX (batch {batch})…")
        prep = prepare(spec, weights, shape)
    cg = prep.graph
    full = prep.onnx_model.SerializeToString() if prep.onnx_model.ByteSize() < 2**31 - 1 else None
    if widths is None:
        if full is None:
            raise LatencyError(
                f"{spec} is > 2 GB once exported; export it with external data and profile the file"
            )
        flops, params = _graph_counts(cg)
        return _Timed(spec, full, flops, params, input_shape, cg, full)
    from onnxconet.space import load_widths
    from onnxconet.surgery.onnx import slice_onnx

    w = load_widths(widths, cg)
    status(f"slicing {spec} to {widths}…")
    keep = cg.keep_mask(w)
    model = slice_onnx(cg, keep)
    if model.ByteSize() >= 2**31 - 1:
        raise LatencyError(
            f"{spec} sliced to {widths} is > 2 GB; write it with external data and profile the file"
        )
    flops, params = _graph_counts(cg, keep)
    return _Timed(spec, model.SerializeToString(), flops, params, input_shape, cg, full)


@dataclass(frozen=True)
class ProfileRequest:
    """What `onnxconet profile` is asked (the CLI fills it from its options).

    Attributes:
        target: an .onnx file or a model spec (None: the built-in digits CNN).
        provider: auto | cpu | cuda | tensorrt; strict: raise when it does not load instead of falling back.
        threads: intra-op threads (0: onnxruntime's default, the physical cores).
        batch: batch size (default: that of `input_shape`, else 1); a model spec is exported with it.
        input_shape: N,C,H,W to export a model spec with (or the concrete shape of an ONNX file with
            symbolic dims).
        widths: a widths file (`onnxconet inspect --widths-out`, or a search's) to slice the target to.
        compare: another .onnx file or model spec; reports "ratio" = target latency / its latency.
        isolated: measure the ratio as deployed (`measure_isolated`: each model alone in fresh processes,
            `pairs` pairs alternated) instead of the in-loop way (`measure_relative`).
        session_config: onnxruntime session config entries the deployment sets.
        weights: state_dict file for a model spec.
        max_seconds: time cap of each measurement (of each process, when isolated).
        device: where to time: "" = this machine, ssh://user@host or http://host:port (latency/device.py).
    """

    target: str | None = None
    provider: str = "auto"
    strict: bool = False
    threads: int = 0
    batch: int | None = None
    input_shape: tuple[int, ...] | None = None
    widths: str | None = None
    compare: str | None = None
    isolated: bool = False
    pairs: int = 4
    session_config: dict | None = None
    weights: str | None = None
    max_seconds: float = 5.0
    device: str = ""


def profile_model(req: ProfileRequest, status: Callable[[str], None] | None = None) -> dict:
    """Time `req.target` on onnxruntime as deployed (and, with `req.compare`, its latency ratio to another model).

    Args:
        req: what to time and how.
        status: called with a short text at each stage (the CLI's spinner).

    Returns:
        ``{"target", "provider", "requested", "fallback", "median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms",
        "runs", "threads", "batch", "input_shape", "onnxruntime", "flops", "params", "widths", "session"}`` plus,
        with `compare`, ``"ratio", "ratio_p10", "ratio_p90", "ratios", "method", "load", "disturbed", "compare"``
        (the other model's spec, median ms, FLOPs, params, and the medians of both in the ratio's measurement).
        "fallback" is None unless the asked provider did not load.
    """
    status = status or (lambda _text: None)
    spec = req.target or "models/digits_cnn.py:digits_cnn"
    Target(provider=req.provider, threads=req.threads, strict=req.strict)  # validates the provider name first
    b, shape = _batch_shape(spec, req.batch, req.input_shape)
    tgt = _target(req, req.provider, b, shape)
    timed = _load(spec, weights=req.weights, batch=b, input_shape=shape, widths=req.widths, status=status)
    status(f"timing {spec} on onnxruntime ({req.provider})…")
    stats = measure(timed.source, tgt, max_seconds=req.max_seconds)
    if timed.note:
        log.warning("%s", timed.note)
    out = {
        "target": spec, "provider": stats.provider, "requested": req.provider, "fallback": stats.fallback,
        "median_ms": stats.median_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms, "mean_ms": stats.mean_ms,
        "std_ms": stats.std_ms, "runs": stats.runs, "threads": stats.threads, "batch": stats.batch,
        "input_shape": list(stats.input_shape), "onnxruntime": stats.onnxruntime, "flops": timed.flops,
        "params": timed.params, "widths": req.widths, "session": tgt.describe(),
        "device": tgt.on().identity() | {"target": tgt.device_name},
    }  # fmt: skip
    if req.compare is not None:
        out |= _compare(req, timed, stats, status)
    return out


def _target(req: ProfileRequest, provider: str, batch: int, shape) -> Target:
    config = tuple((req.session_config or {}).items())
    return Target(
        provider=provider, threads=req.threads, strict=req.strict, batch=batch, input_shape=shape,
        session_config=config, device=req.device,
    )  # fmt: skip


def _compare(req: ProfileRequest, timed: _Timed, stats, status) -> dict:
    """The ratio target / `req.compare`, in-loop or as deployed (`req.isolated`)."""
    spec, shape = timed.spec, timed.input_shape
    if req.compare == spec and timed.full is not None and timed.cg is not None:
        other = _Timed(req.compare, timed.full, *_graph_counts(timed.cg), shape)
    else:  # exported (a spec) at the shape the target was timed with
        other = _load(
            req.compare,
            weights=None,
            batch=stats.batch,
            input_shape=stats.input_shape,
            widths=None,
            status=status,
        )
    how = f"as deployed, {req.pairs} process pairs" if req.isolated else "in-loop"
    status(f"timing {spec} against {req.compare} ({how})…")
    # on the provider the first measurement really used: no second round of failed GPU attempts and warnings
    pinned = _target(req, _PROVIDER_NAMES.get(stats.provider, req.provider), stats.batch, shape)
    if req.isolated:
        rel = measure_isolated(timed.source, other.source, pinned, pairs=req.pairs, seconds=req.max_seconds)
    else:
        rel = measure_relative(timed.source, other.source, pinned, max_seconds=req.max_seconds)
    if other.note:
        log.warning("%s", other.note)
    return {
        "ratio": rel.ratio, "ratio_p10": rel.ratio_p10, "ratio_p90": rel.ratio_p90, "ratios": rel.ratios,
        "method": rel.method, "load": rel.load, "disturbed": rel.disturbed,
        "compare": {
            "target": req.compare, "median_ms": rel.reference.median_ms, "flops": other.flops,
            "params": other.params, "rounds": rel.rounds, "target_ms": rel.candidate.median_ms,
        },
    }  # fmt: skip
