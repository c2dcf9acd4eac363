"""torch -> ONNX, once per model. Initializer names are the state_dict keys, so every ONNX weight maps back
to its torch module by name; BatchNormalization stays a separate node (optimize=False)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings

import onnx
import torch

from onnxconet.errors import GraphError, InputShapeError

log = logging.getLogger(__name__)


def export_onnx(
    module: torch.nn.Module, input_shape: tuple[int, ...], name: str = "model"
) -> onnx.ModelProto:
    """Export `module` in eval mode with a random input of `input_shape` (dynamo exporter, no optimization).

    Raises:
        InputShapeError: the model does not run on that input shape.
        GraphError: the exporter fails.
    """
    module = module.eval()
    x = torch.randn(*input_shape)
    try:
        with torch.no_grad():
            module(x)
    except Exception as e:  # noqa: BLE001 - any failure here means the shape does not fit
        raise InputShapeError(
            f"{name} does not run on input shape {tuple(input_shape)}: {_first_line(e)}; pass --input-shape 1,C,H,W"
        ) from None
    t0 = time.perf_counter()
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                module,
                (x,),
                dynamo=True,
                optimize=False,
                verbose=False,
                input_names=["input"],
                output_names=["output"],
            )
    except Exception as e:  # noqa: BLE001 - exporter errors are many and long
        log.debug("exporter output:\n%s", sink.getvalue())
        raise GraphError(f"{name}: torch.onnx.export failed: {_first_line(e)}") from None
    model, folded = fold_castlike(prog.model_proto)
    log.debug("%d CastLike nodes turned into Cast", folded)
    log.info(
        "exported %s to ONNX in %.1f s (%d nodes)", name, time.perf_counter() - t0, len(model.graph.node)
    )
    missing = _params_missing(module, model)
    if missing:
        log.warning(
            "%s: %d parameters are not used at inference (e.g. %s): modules that run only in training "
            "are not sliced; build the model without them before training pruned copies",
            name,
            len(missing),
            missing[0],
        )
    return model


def fold_castlike(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """CastLike(x, like) -> Cast(x, to=dtype of like) wherever that dtype is known statically.

    The dynamo exporter (optimize=False) writes conv biases as Expand(CastLike(0, input), Shape(weight)) and
    Clip bounds as CastLike(bound, x). onnxruntime cannot constant-fold a CastLike whose second input is an
    activation, so Conv+BatchNormalization and Conv+activation fusion and the NCHWc layout are all skipped:
    measured interleaved, the folded graph runs at 0.64 (resnet18), 0.43 (mobilenet_v2), 0.44
    (efficientnet_b0) of the unfolded one's latency. Same channel groups (same fingerprint).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types |= {t.name: t.data_type for t in g.initializer}
    n = 0
    for i, node in enumerate(g.node):
        if node.op_type == "CastLike" and types.get(node.input[1]):
            cast = onnx.helper.make_node(
                "Cast", [node.input[0]], list(node.output), name=node.name, to=types[node.input[1]]
            )
            g.node[i].CopyFrom(cast)
            n += 1
    return m, n


def _params_missing(module: torch.nn.Module, model: onnx.ModelProto) -> list[str]:
    names = {t.name for t in model.graph.initializer}
    return [k for k, _ in module.named_parameters() if k not in names]


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
