"""The pruning oracle shared by tests: zero the channels pruning removes; the pruned model (torch and ONNX)
must give the same outputs as the zeroed full model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from onnxconet.graph.export import export_onnx
from onnxconet.graph.groups import ChannelGraph
from onnxconet.surgery.onnx import check_onnx, slice_onnx
from onnxconet.surgery.torch import slice_torch, zero_pruned


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so a removed channel is not accidentally zero already."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model.eval()


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def run_torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = model.eval()(torch.from_numpy(x))
    return (y[0] if isinstance(y, (tuple, list)) else y).numpy()


def check_model(model: torch.nn.Module, input_shape, ratio: float = 0.5, seed: int = 0) -> dict:
    """Full-width surgery equals the original; pruned torch == pruned ONNX == zeroed original."""
    model = randomize_norms(model, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    proto = export_onnx(model, input_shape)
    cg = ChannelGraph(proto)
    y_full = run_torch(model, x)

    full = cg.keep_mask(cg.full_widths())
    assert full.all()
    assert cg.param_slices(full) == {}
    full_onnx = slice_onnx(cg, full)
    np.testing.assert_array_equal(run_onnx(full_onnx, x), run_onnx(proto, x))
    np.testing.assert_array_equal(run_torch(slice_torch(model, {}), x), y_full)

    keep = cg.keep_mask(cg.uniform_widths(ratio))
    assert not keep.all(), "the plan removes nothing: the oracle would be vacuous"
    pruned_onnx = slice_onnx(cg, keep)
    check_onnx(pruned_onnx)
    pruned_torch = slice_torch(model, cg.param_slices(keep))
    zeroed = zero_pruned(model, cg, keep)
    y_zero, y_pt, y_po = run_torch(zeroed, x), run_torch(pruned_torch, x), run_onnx(pruned_onnx, x)
    scale = max(1.0, float(np.abs(y_zero).max()))
    assert y_pt.shape == y_full.shape == y_po.shape
    d_torch = float(np.abs(y_pt - y_zero).max()) / scale
    d_onnx = float(np.abs(y_po - y_pt).max()) / scale
    assert d_torch < 1e-4, f"pruned torch differs from the zeroed original by {d_torch}"
    assert d_onnx < 1e-4, f"pruned ONNX differs from the pruned torch model by {d_onnx}"
    # the caller's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return {"cg": cg, "keep": keep, "changed": float(np.abs(y_full - y_zero).max())}
