"""Input-resolution search for `dmasking` (FBNetV2's spatial search), `--resolutions 24,28,32`.

The budget stays relative to the baseline at the model's own input shape (the network as shipped now). For
every searched resolution r (square inputs, H = W = r) the model is exported at (N, C, r, r) and its channel
graph built; the group structure must be the one of the base export (same groups, bundles and members), so a
width configuration and a keep mask mean the same channels at every resolution. The cost of widths w at r,
relative to the baseline:

  * latency: scale_r · predictor_r(w), predictor_r calibrated on r's graph (ratios to the full-width model at
    r) and scale_r = measured latency of the full-width model at r / the baseline's (interleaved);
  * flops / params: effective shapes on r's graph, scaled by its full-width count / the baseline's.

The supernet samples a resolution per weights step and takes the expectation over resolutions in its logits
step (see `search/dmasking/`); after it, the argmax resolution r* is bound for the rest of the run: the
derived candidates are cut from r*'s graph, trained and validated on batches resized to r* (`ResizedLoader`,
bilinear), measured against the base baseline, and best.onnx takes (N, C, r*, r*).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxconet.errors import OnnxconetError
from onnxconet.files import atomic_write
from onnxconet.graph.export import export_onnx
from onnxconet.graph.groups import ChannelGraph
from onnxconet.latency.predictor import LatencyPredictor
from onnxconet.latency.profile import measure_relative
from onnxconet.search.calibration import calibrated_predictor
from onnxconet.search.effective import EffectiveCost
from onnxconet.surgery.parity import onnx_with_weights

log = logging.getLogger(__name__)
SCALES = "resolutions.json"
MIN_RESOLUTION = 8


def parse_resolutions(text: str | None) -> list[int] | None:
    """'24,28,32' -> [24, 28, 32] (sorted, unique); None or '' -> None."""
    if text is None or not str(text).strip():
        return None
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise OnnxconetError(
            f"--resolutions {text!r}: give square input sizes as a comma list of integers, e.g. 24,28,32"
        ) from None
    return check_resolutions(values)


def check_resolutions(values) -> list[int]:
    values = sorted({int(v) for v in values})
    if not values:
        raise OnnxconetError("--resolutions is empty; give square input sizes, e.g. 24,28,32")
    small = [v for v in values if v < MIN_RESOLUTION]
    if small:
        raise OnnxconetError(
            f"--resolutions {small[0]} is below {MIN_RESOLUTION}; give input sizes of at least {MIN_RESOLUTION}"
        )
    return values


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """A batch (N, C, H, W) resized to (N, C, size, size), bilinear (unchanged when it already is)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class ResizedLoader:
    """A DataLoader whose image batches come out resized to `size` x `size` (everything else passes through)."""

    def __init__(self, loader, size: int) -> None:
        self.loader, self.size = loader, int(size)

    def __iter__(self):
        for x, y in self.loader:
            yield resize(x, self.size), y

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


@dataclass
class Resolution:
    """One searched input resolution: its channel graph and its cost relative to the baseline."""

    size: int
    cg: ChannelGraph
    onnx_model: onnx.ModelProto
    scale: float = 1.0  # full-width cost at this resolution / the baseline's
    predictor: object | None = None  # LatencyPredictor (budget on latency)
    effective: object | None = None  # EffectiveCost (budget on flops | params)

    def input_shape(self, base: tuple[int, ...]) -> tuple[int, ...]:
        return (*base[:2], self.size, self.size)


def _structure_mismatch(a: ChannelGraph, b: ChannelGraph) -> str | None:
    if len(a.groups) != len(b.groups):
        return f"{len(b.groups)} channel groups instead of {len(a.groups)}"
    for ga, gb in zip(a.groups, b.groups, strict=True):
        if (
            ga.channels != gb.channels
            or ga.divisor != gb.divisor
            or not np.array_equal(ga.bundles, gb.bundles)
        ):
            return f"group {ga.id} has {gb.channels} channels (divisor {gb.divisor}) instead of {ga.channels}"
    if set(a.members) != set(b.members):
        diff = sorted(set(a.members) ^ set(b.members))[0]
        return f"parameter {diff[0]} (axis {diff[1]}) is grouped differently"
    for key, m in a.members.items():
        if not np.array_equal(a.bundle_of_id[m.ids], b.bundle_of_id[b.members[key].ids]):
            return f"parameter {key[0]} (axis {key[1]}) is grouped differently"
    return None


def graphs_at(prep, resolutions: list[int]) -> list[Resolution]:
    """Export the model at every resolution and check its channel groups against the base export.

    Raises:
        OnnxconetError: the model does not run at a resolution (one line: which, and that it needs global
            pooling), its output changes shape, or its channel groups differ from the base export's.
    """
    base = tuple(prep.loaded.input_shape)
    if len(base) != 4:
        raise OnnxconetError(
            f"--resolutions needs an image model with input (N, C, H, W); {prep.loaded.spec} takes {base}"
        )
    base_out = prep.graph.graph.shape(prep.graph.graph.outputs[0])
    out = []
    for r in resolutions:
        if base[2:] == (r, r):
            out.append(Resolution(r, prep.graph, prep.onnx_model))
            continue
        shape = (*base[:2], r, r)
        try:
            model = export_onnx(prep.loaded.module, shape, name=prep.loaded.spec)
        except OnnxconetError as e:
            first = str(e).split(": ", 1)[-1].split("; pass --input-shape")[0]
            raise OnnxconetError(
                f"--resolutions {r}: {prep.loaded.spec} does not run on input {shape} ({first[:160]}); "
                "resolution search needs a model with global pooling before its classifier "
                f"(not a Flatten->Linear of a fixed spatial size); drop {r} or change the model"
            ) from None
        cg = ChannelGraph(model, f"{prep.loaded.spec}@{r}")
        out_shape = cg.graph.shape(cg.graph.outputs[0])
        if base_out and out_shape and tuple(out_shape) != tuple(base_out):
            raise OnnxconetError(
                f"--resolutions {r}: {prep.loaded.spec} outputs {tuple(out_shape)} at {r}x{r} instead of "
                f"{tuple(base_out)}; resolution search needs a model with global pooling before its classifier"
            )
        why = _structure_mismatch(prep.graph, cg)
        if why is not None:
            raise OnnxconetError(
                f"--resolutions {r}: the export at {r}x{r} has other channel groups than at "
                f"{base[2]}x{base[3]} ({why}); drop {r} from --resolutions"
            )
        out.append(Resolution(r, cg, model))
    return out


def bind_costs(ctx, resolutions: list[Resolution], space, base_predictor=None, probes: int = 6) -> None:
    """Give every resolution its cost relative to the baseline (see the module docstring). Copies the base
    graph's frozen groups. For latency, the predictors (`latency_predictor_<r>.json`) and scales
    (`resolutions.json`) are saved in the run directory and loaded back when the run resumes.

    Args:
        ctx: the run's `RunContext` (base graph, budgeted quantity, teacher, judge, seed, timing, out,
            resume).
        space: the width space the predictors' probes are drawn from.
        base_predictor: the run's predictor, reused at the base resolution.
        probes: measurements per calibrated predictor.
    """
    base_cg, on = ctx.cg, ctx.budget.on
    for res in resolutions:
        for ga, gb in zip(base_cg.groups, res.cg.groups, strict=True):
            gb.prunable, gb.reason = ga.prunable, ga.reason
    if on != "latency":
        base = EffectiveCost(base_cg, on).base
        for res in resolutions:
            res.effective = EffectiveCost(res.cg, on)
            res.scale = res.effective.base / base
        return
    saved_path = Path(ctx.out) / SCALES
    saved = {}
    if ctx.cfg.resume and saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
        except ValueError:
            log.warning("%s is unreadable; measuring again", saved_path)
    state = dict(saved)
    for res in resolutions:
        if res.cg is base_cg and base_predictor is not None:
            res.predictor, res.scale = base_predictor, 1.0
            continue
        if _restored(ctx, res, saved.get(str(res.size))):
            continue
        _calibrate_at(ctx, res, space, probes)
        state[str(res.size)] = {"scale": res.scale, "fingerprint": res.cg.fingerprint()}
        atomic_write(saved_path, json.dumps(state))
    log.info("resolution latency scales: %s", {r.size: round(r.scale, 3) for r in resolutions})


def _predictor_path(ctx, res: Resolution) -> Path:
    return Path(ctx.out) / f"latency_predictor_{res.size}.json"


def _restored(ctx, res: Resolution, got: dict | None) -> bool:
    """`res`'s scale and predictor as a resumed run saved them (same graph fingerprint); False when absent."""
    path = _predictor_path(ctx, res)
    if not got or got.get("fingerprint") != res.cg.fingerprint() or not path.is_file():
        return False
    try:
        res.predictor = LatencyPredictor.load(path, res.cg)
    except OnnxconetError as e:
        log.warning("%s: %s; calibrating a new one", path, e)
        return False
    res.scale = float(got["scale"])
    return True


def _calibrate_at(ctx, res: Resolution, space, probes: int) -> None:
    """Measure `res`'s full-width model against the baseline (its scale) and calibrate its predictor on
    `probes` probes against that full-width model (`calibrated_predictor`, saved in the run directory)."""
    ref_r = onnx_with_weights(res.onnx_model, ctx.teacher.state_dict()).SerializeToString()
    ctx.stage(f"resolution {res.size}: measuring the full-width model against the baseline")
    seconds = ctx.cfg.latency_seconds
    res.scale = (
        1.0
        if res.cg is ctx.cg
        else measure_relative(ref_r, ctx.judge.reference, ctx.judge.target, max_seconds=2 * seconds).ratio
    )
    res.predictor = calibrated_predictor(
        ctx, res.cg, space, probes, _predictor_path(ctx, res), reference=ref_r
    )
