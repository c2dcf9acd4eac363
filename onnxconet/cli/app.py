"""The typer app, its shared options, and the one place that maps library errors to exit codes.

Exit codes: 0 success, 1 a user error (one line on stderr; --debug shows the traceback), 2 usage errors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

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
PretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--pretrained",
        help="torchvision:NAME / timm:NAME with the library's pretrained weights, read from its local cache "
        "(nothing is downloaded; the error says how to get them).",
    ),
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

TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="Measure latency on the edge device instead of this machine: ssh://user@host[:port] (over SSH with "
        "your keys; the device needs python3, numpy and onnxruntime; ?python=PATH picks its interpreter) or "
        "http://host:port (`onnxconet agent` running there).",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="The token `onnxconet agent` printed (default: $ONNXCONET_TOKEN)."),
]


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        envvar="ONNXCONET_STORAGE",
        help="The shared trial store (an Optuna storage): sqlite:///FILE, postgresql://USER:PASS@HOST/DB, "
        "mysql+pymysql://… or journal:FILE (a shared file system). Default with --workers: OUT/study.db. "
        "Also read from $ONNXCONET_STORAGE (keeps a password out of the process list).",
    ),
]
StudyOpt = Annotated[
    str | None,
    typer.Option("--study", help="The study's name in --storage (default: the --out folder's name)."),
]
HeartbeatOpt = Annotated[
    float,
    typer.Option(
        "--heartbeat",
        help="Seconds between a running trial's heartbeats; a worker silent for three is taken as dead and "
        "its trial is run again.",
    ),
]
TorchThreadsOpt = Annotated[
    int,
    typer.Option(
        "--torch-threads",
        min=0,
        help="Training threads per worker (0: the machine's cores shared among the workers).",
    ),
]


def connect_target(url: str | None, token: str | None) -> str:
    """Reach --target once, before any work (one-line error when it cannot be); its URL, or "" = here."""
    if not url:
        return ""
    from onnxconet.latency import device as devices

    _run(devices.connect, url, token)
    return url


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
    except KeyboardInterrupt as e:  # Ctrl-C: the library's Interrupted says where it stopped
        err.print(str(e) or "interrupted", style="yellow", markup=False, highlight=False, soft_wrap=True)
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


def weights_arg(weights: Path | None, pretrained: bool) -> str | None:
    """What --weights / --pretrained ask load_model for."""
    from onnxconet.load import PRETRAINED

    if pretrained and weights:
        err.print("[red]error:[/] --pretrained and --weights both give weights; pass one of them")
        raise typer.Exit(1)
    return PRETRAINED if pretrained else (str(weights) if weights else None)


def _prepare(model: str | None, weights: str | None, input_shape: str | None):
    from onnxconet.load import parse_input_shape
    from onnxconet.prepare import prepare

    shape = _run(parse_input_shape, input_shape)
    with err.status(
        f"exporting {model or 'the built-in digits CNN'} to ONNX and reading its channel groups…",
        spinner="dots",
    ):
        return _run(prepare, model, weights, shape)


def _raise(e: Exception):
    raise e
