"""`onnxconet prune`: one uniform ratio for every group, written and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from onnxconet.cli.app import (
    InputShapeOpt,
    JsonOpt,
    ModelArg,
    PretrainedOpt,
    WeightsOpt,
    _prepare,
    _raise,
    _run,
    app,
    err,
    out,
    weights_arg,
)


@app.command()
def prune(
    model: ModelArg = None,
    ratio: Annotated[
        float, typer.Option("--ratio", help="Share of channels to remove in every prunable group, in [0, 1).")
    ] = 0.5,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the pruned ONNX file.")] = Path(
        "out/pruned.onnx"
    ),
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove the same share of channels from every prunable group (lowest L1 norm first) and write the
    pruned ONNX file, checked against the pruned torch model in onnxruntime."""
    from onnxconet.commands.prune import prune_model
    from onnxconet.errors import SurgeryError

    if not 0 <= ratio < 1:
        _run(
            _raise,
            SurgeryError(f"--ratio {ratio} is outside [0, 1); use e.g. 0.5 to remove half the channels"),
        )
    prep = _prepare(model, weights_arg(weights, pretrained), input_shape)
    with err.status("slicing the ONNX graph and the torch model, checking outputs…", spinner="dots"):
        res = _run(prune_model, prep, ratio, out_path)
    if json_out:
        print(json.dumps({k: v for k, v in res.items() if k != "widths"}))
        return
    t = Table(show_header=True, header_style="bold")
    for c in ("", "before", "after", "ratio"):
        t.add_column(c, justify="right")
    t.add_row(
        "params",
        f"{res['params_before'] / 1e6:.3f} M",
        f"{res['params_after'] / 1e6:.3f} M",
        f"{res['params_after'] / max(res['params_before'], 1):.3f}",
    )
    t.add_row(
        "MACs",
        f"{res['flops_before'] / 1e6:.2f} M",
        f"{res['flops_after'] / 1e6:.2f} M",
        f"{res['flops_after'] / max(res['flops_before'], 1):.3f}",
    )
    out.print(t)
    diff = (
        "n/a (ONNX input)"
        if res["max_abs_diff"] is None
        else f"{res['max_abs_diff']:.2e} (relative to max |output|: {res['max_rel_diff']:.1e})"
    )
    out.print(
        f"wrote {res['onnx']}: {res['groups_pruned']} groups pruned, {res['groups_frozen']} frozen; "
        f"output {tuple(res['output_shape'])}; onnxruntime vs pruned torch max |diff| = {diff}"
    )
