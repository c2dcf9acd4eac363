"""Verification beats cleverness: a width plan must give a torch model and an ONNX model that both run and
agree with each other. A group whose pruning breaks this (a forward() with hard-coded channel counts, an op
whose rule is wrong) is found by checking groups one at a time and is frozen with the reason.

(Equality with the original with the removed channels zeroed is the tests' oracle, not checked here: it does
not hold through ops that normalize across channels, e.g. ConvNeXt's LayerNorm over C.)"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from onnxconet.errors import GraphError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.prepare import Prepared
from onnxconet.surgery.onnx import slice_onnx
from onnxconet.surgery.parity import onnx_outputs, torch_outputs
from onnxconet.surgery.torch import slice_torch

log = logging.getLogger(__name__)


def check_plan(prep: Prepared, keep: np.ndarray, tol: float = 1e-3, seed: int = 0) -> str | None:
    """None when the plan is sound, else a one-line description of what breaks."""
    cg, module = prep.graph, prep.loaded.module
    x = np.random.default_rng(seed).standard_normal(prep.loaded.input_shape).astype(np.float32)
    try:
        y_onnx = onnx_outputs(slice_onnx(cg, keep).SerializeToString(), x)
    except Exception as e:  # noqa: BLE001
        return f"the sliced ONNX does not run ({_first(e)})"
    if module is None:
        return None
    try:
        y_torch = torch_outputs(slice_torch(module, cg.param_slices(keep)), x)
    except Exception as e:  # noqa: BLE001
        return f"the sliced torch model does not run ({_first(e)})"
    if y_torch.shape != y_onnx.shape:
        return f"torch output {y_torch.shape} != ONNX output {y_onnx.shape}"
    scale = max(1.0, float(np.abs(y_torch).max()))
    if float(np.abs(y_onnx - y_torch).max()) / scale > tol:
        return "the sliced ONNX differs from the sliced torch model"
    return None


def freeze_failing(prep: Prepared, widths: dict[int, int]) -> list[int]:
    """Check `widths`; when it fails, check each group alone and freeze the ones that fail. Returns them."""
    cg: ChannelGraph = prep.graph
    if check_plan(prep, cg.keep_mask(widths)) is None:
        return []
    check_runs(prep)  # a model that fails unpruned is one error, not every group frozen with a warning
    frozen = []
    with torch.no_grad():
        for gid, w in sorted(widths.items()):
            g = cg.groups[gid]
            if w >= g.channels or not g.prunable:
                continue
            why = check_plan(prep, cg.keep_mask({gid: w}))
            if why is not None:
                g.prunable = False
                g.reason = f"surgery check failed when pruning it: {why}; frozen"
                frozen.append(gid)
                log.warning("group %d (%s) frozen: %s", gid, ", ".join(g.modules[:2]), why)
    return frozen


def check_runs(prep: Prepared, seed: int = 0) -> None:
    """Raise GraphError with one line when onnxruntime cannot run the model as it is on its input shape."""
    graph, shape = prep.graph.graph, tuple(prep.loaded.input_shape)
    if len(graph.inputs) != 1:
        raise GraphError(
            f"{prep.loaded.spec}: the model has {len(graph.inputs)} inputs ({', '.join(graph.inputs[:4]) or 'none'}); "
            "pruning checks it on one image input: export it with a single input"
        )
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    try:
        onnx_outputs(prep.loaded.onnx_path or prep.onnx_model.SerializeToString(), x)
    except Exception as e:  # noqa: BLE001
        why = re.sub(
            r"Load model from .* failed: ?", "", str(e).strip().splitlines()[0] if str(e).strip() else ""
        )
        raise GraphError(
            f"{prep.loaded.spec}: onnxruntime cannot run the model itself, before any pruning, on input shape "
            f"{shape} ({why[:300] or type(e).__name__}); fix the model or re-export it, or pass the right "
            "--input-shape"
        ) from None


def _first(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]
