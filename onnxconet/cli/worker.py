"""`onnxconet worker`: join a search's shared study from this machine (or another process on this one)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from onnxconet.cli.app import StorageOpt, StudyOpt, _run, app, err, out


@app.command()
def worker(
    storage: StorageOpt = None,
    study: StudyOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where this machine sees the run folder (teacher.pt, baseline.onnx, the latency predictor); "
            "default: the path the study recorded.",
        ),
    ] = None,
    torch_threads: Annotated[
        int,
        typer.Option("--torch-threads", min=0, help="Training threads of this worker (0: torch's default)."),
    ] = 0,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            min=0,
            help="Seconds to wait for the study to appear (the search's first process publishes it once it has "
            "prepared the run: exported, trained the teacher, measured the baseline).",
        ),
    ] = 3600.0,
    start_on_stdin: Annotated[
        bool,
        typer.Option(
            "--start-on-stdin",
            hidden=True,
            help="(search --workers) Load the code, then wait for a line 'go' on stdin before joining; end "
            "quietly at end of input (the search stopped before publishing its study).",
        ),
    ] = False,
) -> None:
    """Run trials of a search started with `onnxconet search … --storage URL --study NAME` until the study holds
    its trials. The run folder must be reachable here (a shared file system, or --out). Kill it at any time:
    its trial is failed by the heartbeat and run again by another worker. The heartbeat is the study's
    (`search --heartbeat`)."""
    from onnxconet.latency.gate import MeasureGate

    # a worker of this machine (search --workers): its start-up pauses the machine's measurements
    gate = MeasureGate(out_dir) if start_on_stdin and out_dir else None
    with gate.shared() if gate is not None else nullcontext():
        from onnxconet.search.parallel import join  # the imports (torch, onnx, optuna): seconds
    if gate is not None:
        gate.close()

    if not storage or not study:
        err.print("[red]error:[/] worker needs --storage URL (or $ONNXCONET_STORAGE) and --study NAME")
        raise typer.Exit(2)
    if start_on_stdin and sys.stdin.readline().strip() != "go":
        err.print("• the search stopped before publishing its study; nothing to do", highlight=False)
        return

    def on_event(event: str, data: dict) -> None:
        if event == "stage":
            err.print(f"• {data['text']}", markup=False, highlight=False)
        elif event == "trial_end":
            r = data["record"]
            acc = (
                f"acc {100 * r['accuracy']:.1f}%"
                if r.get("accuracy") is not None
                else f"failed: {r.get('error')}"
            )
            err.print(f"  trial {r['trial']}: {acc}", markup=False, highlight=False)

    ran = _run(join, storage, study, str(out_dir) if out_dir else None, torch_threads, wait, on_event)
    out.print(f"worker done: ran {len(ran)} trial(s) {ran}", highlight=False)
