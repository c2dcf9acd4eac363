"""The `onnxconet` command line. Each command turns its options into arguments of one library call.

Exit codes: 0 success, 1 a user error (one line on stderr; --debug shows the traceback), 2 usage errors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from onnxconet import __version__
from onnxconet.errors import OnnxconetError

app = typer.Typer(
    name="onnxconet",
    help="Deployment-aware channel-width optimizer for CNNs: channel groups read from the ONNX graph, "
    "widths searched against latency measured with onnxruntime, a pruned ONNX file as the product.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_state = {"debug": False}

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="torchvision:NAME, timm:NAME, path/file.py:factory or model.onnx; default: the built-in digits CNN "
        "(models/digits_cnn.py:digits_cnn).",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Input shape N,C,H,W (default: 224 for torchvision, 299 for "
        "inception_v3, INPUT_SHAPE for models/ files).",
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", help="A state_dict file (loaded with torch.load(weights_only=True))."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
OrtConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--ort-config",
        help="An onnxruntime session config entry your deployment sets, KEY=VALUE (repeatable), e.g. "
        "session.intra_op.allow_spinning=0; default: onnxruntime's defaults.",
    ),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"onnxconet {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """onnxconet: prune CNN channel widths against measured latency."""
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)], force=True
    )


def _run(fn, *args, **kwargs):
    """Call a library function; map its errors to a one-line message and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except OnnxconetError as e:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - unexpected: still one line unless --debug
        if _state["debug"]:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {first} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _prepare(model: str | None, weights: Path | None, input_shape: str | None):
    from onnxconet.load import parse_input_shape
    from onnxconet.prepare import prepare

    shape = _run(parse_input_shape, input_shape)
    with err.status(
        f"exporting {model or 'the built-in digits CNN'} to ONNX and reading its channel groups…",
        spinner="dots",
    ):
        return _run(prepare, model, str(weights) if weights else None, shape)


@app.command()
def inspect(
    model: ModelArg = None,
    input_shape: InputShapeOpt = None,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the channel groups of a model: which layers must keep the same channels, and what is frozen."""
    from onnxconet.inspect import inspect_report

    prep = _prepare(model, weights, input_shape)
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
        detail = text if g["prunable"] else f"{text}\n[dim]{g['reason']}[/]"
        table.add_row(str(g["id"]), str(g["channels"]), str(g["divisor"]), status, detail)
    out.print(table)
    share = report["prunable_channels"] / max(report["total_channels"], 1)
    n_pr = sum(g["prunable"] for g in report["groups"])
    out.print(
        f"{len(report['groups'])} groups, {n_pr} prunable; {report['prunable_channels']}/{report['total_channels']} "
        f"channels prunable ({share:.0%}, graph input/output excluded); params {report['params'] / 1e6:.2f} M, "
        f"MACs {report['flops'] / 1e6:.1f} M at input {tuple(report['input_shape'])}; "
        f"export {report['export_seconds']:.1f} s, groups {report['groups_seconds'] * 1000:.0f} ms"
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
    json_out: JsonOpt = False,
) -> None:
    """Remove the same share of channels from every prunable group (lowest L1 norm first) and write the
    pruned ONNX file, checked against the pruned torch model in onnxruntime."""
    from onnxconet.errors import SurgeryError
    from onnxconet.prune import prune_model

    if not 0 <= ratio < 1:
        _run(
            _raise,
            SurgeryError(f"--ratio {ratio} is outside [0, 1); use e.g. 0.5 to remove half the channels"),
        )
    prep = _prepare(model, weights, input_shape)
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
    weights: WeightsOpt = None,
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
    from onnxconet.latency.profile import parse_session_config
    from onnxconet.load import parse_input_shape
    from onnxconet.profile import profile_model

    shape = _run(parse_input_shape, input_shape)
    with err.status("preparing…", spinner="dots") as spin:
        res = _run(
            profile_model,
            target,
            provider=provider,
            strict=strict,
            threads=threads,
            batch=batch,
            input_shape=shape,
            widths=str(widths) if widths else None,
            compare=compare,
            isolated=isolated,
            pairs=pairs,
            session_config=_run(parse_session_config, ort_config),
            weights=str(weights) if weights else None,
            max_seconds=seconds,
            status=lambda text: spin.update(text),
        )
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


def _raise(e: Exception):
    raise e


from onnxconet import cli_search  # noqa: E402,F401  (registers `search` on the app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
