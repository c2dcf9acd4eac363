"""Torch and onnxruntime outputs of the same model, and the ONNX graph carrying a torch model's weights: the
checks every written ONNX file goes through (prune's output, a search's best.onnx, a plan's verification)."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from onnxconet.errors import SurgeryError


def onnx_outputs(path_or_bytes, x: np.ndarray) -> np.ndarray:
    """First output of the model on `x` with onnxruntime on CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def torch_outputs(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = module.eval()(torch.from_numpy(x))
    return (y[0] if isinstance(y, (tuple, list)) else y).numpy()


def onnx_with_weights(model: onnx.ModelProto, state: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The graph with its initializers replaced by the torch weights of the same names (state_dict keys)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for init in new.graph.initializer:
        t = state.get(init.name)
        if t is None:
            continue
        arr = t.detach().cpu().numpy()
        if tuple(arr.shape) != tuple(init.dims):
            raise SurgeryError(
                f"weight {init.name}: torch shape {tuple(arr.shape)} != ONNX {tuple(init.dims)}"
            )
        init.CopyFrom(
            onnx.numpy_helper.from_array(
                arr.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), init.name
            )
        )
    return new


def max_rel_diff(y_onnx: np.ndarray, y_torch: np.ndarray) -> tuple[float, float]:
    """(max |onnxruntime - torch|, the same over the largest |torch output|): float32 rounding alone gives
    absolute differences of order 1 on outputs of order 1e6 (random-init inception_v3)."""
    diff = float(np.abs(y_onnx - y_torch).max())
    return diff, diff / max(float(np.abs(y_torch).max()), 1e-30)
