"""`onnxconet inspect`: the channel groups of a model, as a table or JSON."""

from __future__ import annotations

import json

from rich.table import Table

from onnxconet.cli.app import (
    InputShapeOpt,
    JsonOpt,
    ModelArg,
    PretrainedOpt,
    WeightsOpt,
    _prepare,
    _run,
    app,
    out,
    weights_arg,
)


@app.command()
def inspect(
    model: ModelArg = None,
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show the channel groups of a model: which layers must keep the same channels, and what is frozen."""
    from onnxconet.commands.inspect import inspect_report

    prep = _prepare(model, weights_arg(weights, pretrained), input_shape)
    report = _run(inspect_report, prep)
    if json_out:
        print(json.dumps(report))
        return
    table = Table(title=f"{report['model']} — channel groups", header_style="bold")
    for col in ("id", "channels", "÷", "prunable", "producers / reason"):
        table.add_column(col, overflow="fold")
    for g in report["groups"]:
        producers = sorted({m["module"] for m in g["members"] if m["role"] == "producer"})
        text = ", ".join(producers[:4]) + (f" … (+{len(producers) - 4})" if len(producers) > 4 else "")
        status = "[green]yes[/]" if g["prunable"] else "[red]frozen[/]"
        if g.get("removable"):
            status += "\n[cyan]or 0[/]"
        detail = text if g["prunable"] else f"{text}\n[dim]{g['reason']}[/]"
        table.add_row(str(g["id"]), str(g["channels"]), str(g["divisor"]), status, detail)
    out.print(table)
    share = report["prunable_channels"] / max(report["total_channels"], 1)
    n_pr = sum(g["prunable"] for g in report["groups"])
    n_rm = sum(bool(g.get("removable")) for g in report["groups"])
    out.print(
        f"{len(report['groups'])} groups, {n_pr} prunable ({n_rm} may be 0 with search --depth: their residual "
        f"branch goes); {report['prunable_channels']}/{report['total_channels']} "
        f"channels prunable ({share:.0%}, graph input/output excluded); params {report['params'] / 1e6:.2f} M, "
        f"MACs {report['flops'] / 1e6:.1f} M at input {tuple(report['input_shape'])}; "
        f"export {report['export_seconds']:.1f} s, groups {report['groups_seconds'] * 1000:.0f} ms"
    )
