"""Model specs -> an nn.Module and its input shape. One loader for every command.

Specs:
    torchvision:NAME       any torchvision classification model, randomly initialized (never downloads);
                           with weights=PRETRAINED (--pretrained) torchvision's weights from the local torch hub cache
    timm:NAME              a timm model, randomly initialized (needs `pip install timm`); PRETRAINED: timm's
                           weights from the local Hugging Face cache
    path/to/file.py:FACTORY  calls FACTORY() from that file; the file may declare INPUT_SHAPE = (1, C, H, W)
    path/to/model.onnx     an ONNX file (inspect/prune/profile work on the graph alone; no torch side)
    default                the built-in digits CNN (models/digits_cnn.py:digits_cnn)
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from onnxconet.errors import InputShapeError, ModelSpecError

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_SPEC = "models/digits_cnn.py:digits_cnn"
# the weights argument --pretrained passes: the library's own weights, from its local cache
PRETRAINED = "pretrained:"
# torchvision models that need a larger input than 224, and constructor arguments that keep them exportable
_TV_INPUT = {"inception_v3": 299}
_TV_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# the training-only heads built away above: a state_dict saved with them loads, their keys ignored with a warning
_TV_AUX = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}


@dataclass
class LoadedModel:
    """A resolved spec: the module (None for an ONNX file), its input shape, and a display name."""

    spec: str
    name: str
    module: nn.Module | None
    input_shape: tuple[int, ...]
    onnx_path: str | None = None


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,3,224,224' -> (1, 3, 224, 224); None stays None."""
    if text is None or text == "":
        return None
    try:
        dims = tuple(int(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise InputShapeError(
            f"--input-shape '{text}' is not a list of integers; use e.g. 1,3,224,224"
        ) from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise InputShapeError(f"--input-shape '{text}' must be positive dims N,C[,H,W]; use e.g. 1,3,224,224")
    return dims


def load_model(
    spec: str | None = None, weights: str | None = None, input_shape: tuple[int, ...] | None = None
) -> LoadedModel:
    """Resolve a model spec (see module docstring) and optionally load a state_dict into it.

    Raises:
        ModelSpecError: unknown name, missing file, factory that raises, weights that do not fit.
    """
    spec = spec or DEFAULT_SPEC
    if spec == "default":
        spec = DEFAULT_SPEC
    if spec.startswith("torchvision:"):
        loaded = _torchvision(spec)
    elif spec.startswith("timm:"):
        loaded = _timm(spec)
    elif spec.lower().endswith(".onnx"):
        loaded = _onnx_file(spec, input_shape)
    elif ".py" in spec:
        loaded = _python_file(spec)
    else:
        p = Path(spec)
        if p.exists():
            raise ModelSpecError(f"{spec}: neither an ONNX file (.onnx) nor a Python file (.py:factory)")
        raise ModelSpecError(
            f"unknown model spec '{spec}': use torchvision:NAME, timm:NAME, path/file.py:factory "
            "or path/model.onnx"
        )
    if input_shape is not None:
        loaded.input_shape = tuple(input_shape)
    if weights == PRETRAINED:
        load_pretrained(loaded)
    elif weights:
        if loaded.module is None:
            raise ModelSpecError(f"--weights applies to torch models, not to the ONNX file {spec}")
        load_weights(loaded.module, weights, _aux_heads(loaded.spec))
    return loaded


def _aux_heads(spec: str) -> tuple[str, ...]:
    return _TV_AUX.get(spec.split(":", 1)[1], ()) if spec.startswith("torchvision:") else ()


def load_pretrained(loaded: LoadedModel) -> None:
    """The library's pretrained weights from its local cache; never downloads (one line says how to get them)."""
    spec = loaded.spec
    if spec.startswith("torchvision:"):
        load_weights(loaded.module, str(torchvision_cached_weights(spec.split(":", 1)[1])), _aux_heads(spec))
    elif spec.startswith("timm:"):
        _timm_pretrained(loaded)
    else:
        raise ModelSpecError(
            f"--pretrained applies to torchvision:NAME and timm:NAME; for {spec} pass --weights FILE"
        )


def torchvision_cached_weights(name: str) -> Path:
    """Where torchvision keeps `name`'s default weights (torch hub's checkpoints folder), if they are there."""
    from urllib.parse import urlparse

    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError, KeyError):
        raise ModelSpecError(f"torchvision:{name} has no pretrained weights in torchvision") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        raise ModelSpecError(
            f"torchvision:{name} --pretrained: {path} is not there and nothing is downloaded at run time; on a "
            f"connected machine run python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='DEFAULT')\" and copy {path.name} into {path.parent}, or pass --weights FILE"
        )
    return path


def _timm_pretrained(loaded: LoadedModel) -> None:
    import os

    import timm

    name = loaded.spec.split(":", 1)[1]
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the cache or nothing
    try:
        state = timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(
            f"timm:{name} --pretrained: its weights are not in the local Hugging Face cache ({type(e).__name__}); "
            f"on a connected machine run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
            "and copy ~/.cache/huggingface here, or pass --weights FILE"
        ) from None
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    loaded.module.load_state_dict(state)


def load_weights(module: nn.Module, path: str, aux_heads: tuple[str, ...] = ()) -> None:
    """Load a state_dict file with torch.load(weights_only=True): never unpickles arbitrary objects.

    Keys of `aux_heads` (top-level module names the model was built without: training-only heads that never reach
    the exported graph) are ignored with a one-line warning; any other key that does not fit is an error.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelSpecError(f"--weights {path}: file not found")
    state = _safe_load(p, path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSpecError(
            f"--weights {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}"
        )
    odd = next(
        (
            k
            for k, v in state.items()
            if not isinstance(k, str) or not k.endswith("_extra_state") and not torch.is_tensor(v)
        ),
        None,
    )
    if odd is not None:
        raise ModelSpecError(
            f"--weights {path}: expected a state_dict (tensors by parameter name), found the entry {odd!r:.60} "
            f"-> {type(state[odd]).__name__}; save it with torch.save(model.state_dict(), path)"
        )
    own = module.state_dict()
    unused = [k for k in state if k not in own and k.split(".", 1)[0] in aux_heads]
    if unused:
        heads = sorted({k.split(".", 1)[0] for k in unused})
        log.warning(
            "--weights %s: ignored the %d keys of %s (training-only auxiliary heads: the model is built without "
            "them and the exported graph does not use them)",
            path, len(unused), ", ".join(heads),
        )  # fmt: skip
        state = {k: v for k, v in state.items() if k not in set(unused)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:200]]
        raise ModelSpecError(f"--weights {path} does not fit the model: {first[0][:300]}") from None


def _safe_load(p: Path, path: str):
    """torch.load(weights_only=True), its refusals in our words: torch's advice on unpickling a refused file
    (weights_only=False, allow-listing globals) is the wrong advice for a file that may be hostile, and its
    warnings are not shown on a user error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused by the safe unpickler, truncated, not a torch file, ...
        raise _load_error(e, path) from None


def _load_error(e: Exception, path: str) -> ModelSpecError:
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        held = f"it holds Python objects that could run code when unpickled ({found.group(1)})" if found else (
            "it is not a file that loads without running code (a plain pickle?)"
        )  # fmt: skip
        return ModelSpecError(
            f"--weights {path} refused: {held}; save only the state_dict: torch.save(model.state_dict(), path)"
        )
    said = re.split(r"(?<=\.)\s", text.splitlines()[0])[0] if text else type(e).__name__
    return ModelSpecError(
        f"--weights {path}: not a loadable state_dict ({said[:200]}); save it with "
        "torch.save(model.state_dict(), path)"
    )


def _torchvision(spec: str) -> LoadedModel:
    import torchvision

    name = spec.split(":", 1)[1]
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if name.lower()[:4] in m][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(
            f"unknown torchvision model '{name}'{hint}; see torchvision.models.list_models()"
        )
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None, **_TV_KWARGS.get(name, {}))
    res = _TV_INPUT.get(name, 224)
    return LoadedModel(spec, name, module.eval(), (1, 3, res, res))


def _timm(spec: str) -> LoadedModel:
    name = spec.split(":", 1)[1]
    try:
        import timm
    except ImportError:
        raise ModelSpecError(
            f"{spec}: timm is not installed; pip install timm (or pip install 'onnxconet[timm]')"
        ) from None
    try:
        module = timm.create_model(name, pretrained=False)
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"{spec}: timm cannot build it ({str(e).splitlines()[0][:200]})") from None
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    shape = (1, *cfg.get("input_size", (3, 224, 224)))
    return LoadedModel(spec, name, module.eval(), tuple(shape))


def _python_file(spec: str) -> LoadedModel:
    path_s, _, factory = spec.partition(".py:")
    path_s += ".py"
    if not factory:
        if spec.endswith(".py"):
            raise ModelSpecError(f"{spec}: name the factory function, e.g. {spec}:build_model")
        raise ModelSpecError(f"unknown model spec '{spec}': use path/file.py:factory")
    path = Path(path_s)
    if not path.is_file() and not path.is_absolute() and (MODELS_DIR.parent / path).is_file():
        path = MODELS_DIR.parent / path  # models/x.py works from any directory
    if not path.is_file():
        raise ModelSpecError(f"{path_s}: file not found")
    mod_name = f"onnxconet_user_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    try:
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        spec_obj.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(
            f"{path}: importing it failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelSpecError(f"{path}: no factory '{factory}' (callables there: {', '.join(names[:8])})")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(
            f"{path}:{factory}() raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    shape = getattr(module, "INPUT_SHAPE", None)
    if shape is None:
        shape = (1, 3, 224, 224)
        log.warning("%s declares no INPUT_SHAPE; assuming %s (pass --input-shape)", path, shape)
    return LoadedModel(spec, f"{path.stem}:{factory}", model.eval(), tuple(int(d) for d in shape))


_MAX_INPUT_VALUES = 1 << 31  # a declared ONNX input larger than this (8 GiB of float32) is a damaged shape


def _onnx_file(spec: str, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    from onnxconet.graph.ir import load_onnx

    p = Path(spec)
    if not p.is_file():
        raise ModelSpecError(f"{spec}: file not found")
    model = load_onnx(str(p))
    inp = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = tuple(d.dim_value or 1 for d in inp[0].type.tensor_type.shape.dim) if inp else ()
    if input_shape is None and inp:  # prune and the checks allocate an input of this shape
        values = 1
        for d in dims:
            values *= d
        if any(d < 1 for d in dims) or values > _MAX_INPUT_VALUES:
            raise InputShapeError(
                f"{spec}: input '{inp[0].name}' declares shape {dims}"
                + (f" ({values} values)" if values > _MAX_INPUT_VALUES else "")
                + ", not an input that can be run; pass --input-shape N,C,H,W (or fix the file)"
            )
    return LoadedModel(spec, p.stem, None, dims, onnx_path=str(p))
