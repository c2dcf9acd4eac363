"""Slice a torch module to a width plan: a new module, the caller's stays untouched.

Parameters are found by their state_dict key (= the ONNX initializer name); after slicing, the size
attributes of the standard layers (in/out channels, groups, num_features...) are updated so that
`repr(model)` and re-exports are right.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxconet.errors import SurgeryError
from onnxconet.graph.groups import ChannelGraph, split_param_name

Slices = Mapping[str, list[tuple[int, np.ndarray]]]


def slice_torch(module: nn.Module, slices: Slices) -> nn.Module:
    """A deep copy of `module` with every parameter/buffer in `slices` cut to its kept positions."""
    new = copy.deepcopy(module)
    touched: dict[str, tuple[nn.Module, dict]] = {}
    for name, ops in slices.items():
        mod_name, pname = split_param_name(name)
        try:
            mod = new.get_submodule(mod_name) if mod_name else new
        except AttributeError:
            raise SurgeryError(
                f"parameter '{name}' of the ONNX graph has no module '{mod_name}' in the torch model; "
                "export and prune the same model"
            ) from None
        if mod_name not in touched:
            touched[mod_name] = (mod, _sizes(mod))
        t = getattr(mod, pname, None)
        if not isinstance(t, torch.Tensor):
            raise SurgeryError(f"'{name}' is not a parameter or buffer of the torch model")
        data = t.detach()
        for axis, idx in ops:
            data = data.index_select(
                axis, torch.as_tensor(np.asarray(idx), dtype=torch.long, device=data.device)
            )
        data = data.clone()
        if pname in mod._parameters:
            mod._parameters[pname] = nn.Parameter(data, requires_grad=t.requires_grad)
        elif pname in mod._buffers:
            mod._buffers[pname] = data
        else:
            raise SurgeryError(f"'{name}' is neither a parameter nor a buffer (a tied or computed tensor)")
    for mod, before in touched.values():
        _fix_attributes(mod, before)
        _empty_forward(mod)
    return new


# ------------------------------------------------------------------------------------ removed branches
# A group at width 0 (graph.branches) leaves layers with no output channel and layers with no input channel,
# which torch cannot run: their class becomes a subclass whose forward computes what the ONNX surgery folds.
# Parameters and state_dict keys stay as they are (empty tensors, the bias).
def _conv_probe(mod: nn.Module, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The conv's output shape at `out_channels`, every value its bias (0 without one)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(mod.kernel_size)]
    probe = x.new_zeros((x.shape[0], 1) + tuple(x.shape[2:]))
    w = x.new_zeros((max(out_channels, 1), 1) + tuple(mod.kernel_size))
    bias = mod.bias if out_channels and mod.bias is not None else None
    y = conv(probe, w, bias, mod.stride, mod.padding, mod.dilation, 1)
    return y if out_channels else y[:, :0]


def _no_output(self, x: torch.Tensor) -> torch.Tensor:
    if isinstance(self, nn.Linear):
        return x.new_zeros(tuple(x.shape[:-1]) + (0,))
    return _conv_probe(self, x, 0)


def _bias_only(self, x: torch.Tensor) -> torch.Tensor:
    if isinstance(self, nn.Linear):
        out = x.new_zeros(tuple(x.shape[:-1]) + (self.out_features,))
        return out + self.bias if self.bias is not None else out
    return _conv_probe(self, x, self.out_channels)


def _passthrough(self, x: torch.Tensor) -> torch.Tensor:
    return x  # a norm over no channel


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap(mod: nn.Module, kind: str, forward) -> None:
    cls = type(mod)
    if cls.__name__.startswith("Removed"):
        return
    key = (cls, kind)
    if key not in _SUBCLASSES:
        name = f"Removed{kind}{cls.__name__}"
        sub = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = sub  # picklable
        _SUBCLASSES[key] = sub
    mod.__class__ = _SUBCLASSES[key]


def _empty_forward(mod: nn.Module) -> None:
    w = getattr(mod, "weight", None)
    layer = isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed)
    if layer and w.shape[0] == 0:
        _swap(mod, "NoOutput", _no_output)
    elif layer and w.shape[1] == 0:
        _swap(mod, "BiasOnly", _bias_only)
    elif isinstance(mod, nn.modules.batchnorm._NormBase) and mod.num_features == 0:
        _swap(mod, "Passthrough", _passthrough)


def _sizes(mod: nn.Module) -> dict:
    """Size attributes before slicing (to tell depthwise convs from grouped ones)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return {"in": mod.in_channels, "out": mod.out_channels, "groups": mod.groups}
    return {}


def _fix_attributes(mod: nn.Module, before: dict) -> None:
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.conv._ConvNd):
        if mod.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
        else:
            if before["groups"] > 1 and before["groups"] == before["in"] and w.shape[1] == 1:
                mod.groups = w.shape[0]  # depthwise stays depthwise
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = mod.running_mean if mod.running_mean is not None else w
        mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.LayerNorm) and w is not None:
        mod.normalized_shape = tuple(w.shape)
    elif isinstance(mod, nn.GroupNorm) and w is not None:
        mod.num_channels = w.shape[0]
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = w.numel()


def zero_pruned(module: nn.Module, cg: ChannelGraph, keep: np.ndarray) -> nn.Module:
    """A copy of `module` whose channels that `keep` removes are zero (producer rows, biases, BN gamma/beta,
    depthwise filters), so they output exactly 0: the oracle the pruned model must equal."""
    new = copy.deepcopy(module)
    state = new.state_dict()
    with torch.no_grad():
        for (param, axis), m in cg.members.items():
            if m.role == "consumer" or param.endswith("running_var") or param not in state:
                continue
            drop = np.nonzero(~keep[cg.bundle_of_id[m.ids]])[0]
            if len(drop):
                state[param].index_fill_(axis, torch.as_tensor(drop, dtype=torch.long), 0.0)
    return new
