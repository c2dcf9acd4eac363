"""The run's latency predictors: one place that loads a saved predictor when a run resumes, or calibrates one on
measured probes and saves it (the search's own, dmasking's, one per searched resolution)."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxconet.errors import OnnxconetError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.latency.device import LOCAL_NAME
from onnxconet.latency.predictor import LatencyPredictor, calibrate, probe_widths
from onnxconet.space import WidthSpace

log = logging.getLogger(__name__)
PREDICTOR = "latency_predictor.json"


def calibrated_predictor(
    ctx, cg: ChannelGraph, space: WidthSpace, n: int, path: Path, reference: bytes | None = None
) -> LatencyPredictor:
    """A latency predictor of `cg`: `path`'s when the run resumes and it still fits `cg`, else calibrated on `n`
    probes measured in-loop against `reference` (default: the baseline, through the run's paired runners) and
    saved to `path`.

    Args:
        ctx: the run's `RunContext` (judge, seed, timing, resume, progress).
    """
    if path.is_file() and ctx.cfg.resume:
        device = ctx.judge.target.device_name
        try:
            pred = LatencyPredictor.load(path, cg)
            made_on = (pred.target or {}).get("device", LOCAL_NAME)  # older files: this machine
            if made_on == device:
                return pred
            log.warning(
                "%s was calibrated on %s, this run measures on %s; calibrating a new one",
                path,
                made_on,
                device,
            )
        except OnnxconetError as e:
            log.warning("%s: %s; calibrating a new one", path, e)
    ctx.stage(f"calibrating the latency predictor on {n} measured candidates")
    judge = ctx.judge
    pred, _ = calibrate(
        cg, judge.reference if reference is None else reference, judge.target,
        probe_widths(space, n, ctx.cfg.seed), measurer=judge.measurer if reference is None else None,
        max_seconds=ctx.cfg.latency_seconds / 2,
    )  # fmt: skip
    pred.save(path)
    return pred
