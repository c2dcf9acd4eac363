"""`onnxconet prune`: cut every prunable group to a uniform ratio, write the ONNX file, check it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from onnxconet.errors import SurgeryError
from onnxconet.graph.ir import save_onnx
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.prepare import Prepared
from onnxconet.surgery.onnx import check_onnx, slice_onnx
from onnxconet.surgery.parity import max_rel_diff, onnx_outputs, torch_outputs
from onnxconet.surgery.torch import slice_torch

log = logging.getLogger(__name__)


def prune_model(prep: Prepared, ratio: float, out: str | Path, seed: int = 0) -> dict:
    """Keep round((1-ratio)*C) channels of every prunable group (L1-top), write `out`, compare it with the
    pruned torch model on a random input. Returns the `prune --json` object."""
    from onnxconet.surgery.verify import freeze_failing

    cg = prep.graph
    widths = cg.uniform_widths(ratio)
    if freeze_failing(prep, widths):
        widths = cg.uniform_widths(ratio)
    keep = cg.keep_mask(widths)
    pruned = slice_onnx(cg, keep)
    check_onnx(pruned)
    save_onnx(pruned, str(out))
    x = np.random.default_rng(seed).standard_normal(prep.loaded.input_shape).astype(np.float32)
    try:
        y_onnx = onnx_outputs(str(out), x)
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(
            f"{out}: the pruned ONNX does not run in onnxruntime: {str(e).splitlines()[0][:300]}"
        ) from None
    max_diff = rel_diff = None
    if prep.loaded.module is not None:
        pt = slice_torch(prep.loaded.module, cg.param_slices(keep))
        y_torch = torch_outputs(pt, x)
        if y_torch.shape != y_onnx.shape:
            raise SurgeryError(
                f"{out}: output shape {y_onnx.shape} differs from the pruned torch model's {y_torch.shape}"
            )
        max_diff, rel_diff = max_rel_diff(y_onnx, y_torch)
    frozen = [g for g in cg.groups if not g.prunable and not g.fixed_io]
    total, prunable = cg.total_channels()
    return {
        "onnx": str(out),
        "params_before": count_params(cg),
        "params_after": count_params(cg, keep),
        "flops_before": count_flops(cg),
        "flops_after": count_flops(cg, keep),
        "groups_pruned": sum(1 for g in cg.prunable if widths[g.id] < g.channels),
        "groups_frozen": len(frozen),
        "max_abs_diff": max_diff,
        "max_rel_diff": rel_diff,
        "output_shape": list(y_onnx.shape),
        "groups": len(cg.groups),
        "total_channels": total,
        "prunable_channels": prunable,
        "export_seconds": round(prep.export_seconds, 3),
        "groups_seconds": round(prep.groups_seconds, 4),
        "widths": {str(k): v for k, v in widths.items()},
    }
