"""`onnxconet inspect`: the channel groups of a model as plain data (layout: `onnxconet.graph.layout`)."""

from __future__ import annotations

from onnxconet.graph.layout import groups_json
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.prepare import Prepared


def inspect_report(prep: Prepared) -> dict:
    cg = prep.graph
    total, prunable = cg.total_channels()
    return {
        "model": prep.loaded.spec,
        "input_shape": list(prep.loaded.input_shape),
        "params": count_params(cg),
        "flops": count_flops(cg),
        "total_channels": total,
        "prunable_channels": prunable,
        "fingerprint": cg.fingerprint(),
        "export_seconds": round(prep.export_seconds, 3),
        "groups_seconds": round(prep.groups_seconds, 4),
        "groups": groups_json(cg),
    }
