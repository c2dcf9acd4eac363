"""Model spec -> exported ONNX -> channel graph: the first steps every command shares."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import onnx

from onnxconet.graph.export import export_onnx
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.ir import load_onnx
from onnxconet.load import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A loaded model, its ONNX export and channel graph, with how long each step took."""

    loaded: LoadedModel
    onnx_model: onnx.ModelProto
    graph: ChannelGraph
    export_seconds: float
    groups_seconds: float


def prepare(
    spec: str | None, weights: str | None = None, input_shape: tuple[int, ...] | None = None
) -> Prepared:
    """Load the spec, export it once (or read the ONNX file) and build its channel groups."""
    loaded = load_model(spec, weights=weights, input_shape=input_shape)
    t0 = time.perf_counter()
    if loaded.module is None:
        model = load_onnx(loaded.onnx_path)
    else:
        model = export_onnx(loaded.module, loaded.input_shape, name=loaded.spec)
    export_s = time.perf_counter() - t0
    cg = ChannelGraph(model, loaded.spec)
    log.info(
        "%s: %d groups (%d prunable) in %.3f s",
        loaded.spec,
        len(cg.groups),
        len(cg.prunable),
        cg.build_seconds,
    )
    return Prepared(loaded, model, cg, export_s, cg.build_seconds)
