"""`onnxconet profile`: latency as deployed, and the ratio to another model."""

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
    OrtConfigOpt,
    PretrainedOpt,
    TargetOpt,
    TokenOpt,
    WeightsOpt,
    _run,
    app,
    connect_target,
    err,
    out,
    weights_arg,
)


@app.command()
def profile(
    target: ModelArg = None,
    provider: Annotated[
        str, typer.Option("--provider", help="auto (TensorRT, else CUDA, else CPU), cpu, cuda or tensorrt.")
    ] = "auto",
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Exit 1 when the asked provider cannot load instead of using CPU."),
    ] = False,
    threads: Annotated[
        int, typer.Option("--threads", min=0, help="Intra-op threads; 0 = the physical cores available.")
    ] = 0,
    batch: Annotated[
        int | None, typer.Option("--batch", min=1, help="Batch size (a model spec is exported with it).")
    ] = None,
    input_shape: InputShapeOpt = None,
    widths: Annotated[
        Path | None,
        typer.Option(
            "--widths", help="Widths file (inspect --widths-out, or a search's) to slice the model to."
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Another .onnx or model spec: also report the latency ratio to it (in-loop: two runner "
            "processes taking turns, what the search measures every candidate with).",
        ),
    ] = None,
    isolated: Annotated[
        bool,
        typer.Option(
            "--isolated",
            help="With --compare: the ratio as deployed, each model alone in a fresh process, --pairs pairs "
            "alternated (slower; what a search's final check uses).",
        ),
    ] = False,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="Process pairs of an --isolated ratio.")] = 4,
    ort_config: OrtConfigOpt = None,
    remote: TargetOpt = None,
    token: TokenOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    seconds: Annotated[
        float,
        typer.Option(
            "--seconds", min=0.05, help="Time cap of each measurement (each process with --isolated)."
        ),
    ] = 5.0,
    json_out: JsonOpt = False,
) -> None:
    """Measure a model's latency with onnxruntime as deployed: alone in a fresh process, onnxruntime's default
    session options (an .onnx file, or a model spec exported and optionally sliced to --widths); with
    --compare, its latency ratio to another model."""
    from onnxconet.commands.profile import ProfileRequest, profile_model
    from onnxconet.latency.profile import parse_session_config
    from onnxconet.load import parse_input_shape

    shape = _run(parse_input_shape, input_shape)
    with err.status("preparing…", spinner="dots") as spin:
        req = ProfileRequest(
            target=target, provider=provider, strict=strict, threads=threads, batch=batch, input_shape=shape,
            widths=str(widths) if widths else None, compare=compare, isolated=isolated, pairs=pairs,
            session_config=_run(parse_session_config, ort_config), weights=weights_arg(weights, pretrained),
            max_seconds=seconds, device=connect_target(remote, token),
        )  # fmt: skip
        res = _run(profile_model, req, status=lambda text: spin.update(text))
    if json_out:
        print(json.dumps(res))
        return
    t = Table(title=f"{res['target']} — onnxruntime latency", header_style="bold")
    for c in ("median", "p10", "p90", "mean ± std", "runs"):
        t.add_column(c, justify="right")
    t.add_row(
        f"{res['median_ms']:.3f} ms",
        f"{res['p10_ms']:.3f} ms",
        f"{res['p90_ms']:.3f} ms",
        f"{res['mean_ms']:.3f} ± {res['std_ms']:.3f}",
        str(res["runs"]),
    )
    out.print(t)
    macs = "n/a" if res["flops"] is None else f"{res['flops'] / 1e6:.1f} M"
    params = "n/a" if res["params"] is None else f"{res['params'] / 1e6:.3f} M"
    out.print(
        f"{res['provider']}, {res['threads']} threads, input {tuple(res['input_shape'])}, onnxruntime "
        f"{res['onnxruntime']}; MACs {macs}, params {params}"
        + (f"; widths {res['widths']}" if res["widths"] else "")
    )
    if res["fallback"]:
        out.print(f"[bold yellow]warning:[/] {res['fallback']}", highlight=False, soft_wrap=True)
    out.print(f"session: {res['session']}", highlight=False)
    dev = res["device"]
    out.print(
        f"device: {dev['target']} — {dev['host']}, {dev['cpu']}, {dev['physical_cores']} physical cores, "
        f"onnxruntime {dev['onnxruntime']} ({', '.join(dev['providers'])})",
        highlight=False,
        soft_wrap=True,
    )
    if "ratio" in res:
        c = res["compare"]
        flops_ratio = f"; MACs ratio {res['flops'] / c['flops']:.3f}" if res["flops"] and c["flops"] else ""
        how = (
            f"as deployed, {c['rounds']} process pairs"
            if res["method"] == "isolated-processes"
            else f"in-loop, {c['rounds']} rounds"
        )
        out.print(
            f"vs {c['target']}: latency ratio {res['ratio']:.3f} (p10 {res['ratio_p10']:.3f}, p90 "
            f"{res['ratio_p90']:.3f}; {how}: {c['target_ms']:.3f} ms vs {c['median_ms']:.3f} ms){flops_ratio}",
            highlight=False,
        )
        if res["disturbed"]:
            out.print(
                f"[bold yellow]warning:[/] other programs kept {res['load']:.1f} CPUs busy while measuring; "
                "this ratio is not what a quiet machine gives",
                highlight=False,
            )
