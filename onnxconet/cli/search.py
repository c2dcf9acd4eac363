"""`onnxconet search`: the main job. Options -> SearchConfig -> run_search, with rich progress on stderr."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from onnxconet.cli.app import (
    HeartbeatOpt,
    InputShapeOpt,
    JsonOpt,
    ModelArg,
    OrtConfigOpt,
    PretrainedOpt,
    StorageOpt,
    StudyOpt,
    TargetOpt,
    TokenOpt,
    TorchThreadsOpt,
    WeightsOpt,
    _run,
    app,
    connect_target,
    err,
    out,
    weights_arg,
)


def _renderer(progress: Progress, task_id):
    def on_event(event: str, data: dict) -> None:
        if event == "stage":
            progress.console.print(f"[cyan]•[/] {escape(data['text'])}")  # texts hold E[...] and paths
        elif event == "trial_start":
            progress.update(
                task_id, total=data["trials"], description=f"trial {data['trial'] + 1}/{data['trials']}"
            )
        elif event == "train" and data.get("phase") == "train" and data.get("batches"):
            progress.update(
                task_id,
                description=(
                    f"epoch {data['epoch'] + 1}/{data['epochs']} "
                    f"batch {data['batch']}/{data['batches']} loss {data['loss']:.3f}"
                ),
            )
        elif event == "cuts":
            progress.update(task_id, description=f"loss curves: cut {data['done']}/{data['total']}")
        elif event == "path":
            progress.update(
                task_id,
                description=f"loss path: step {data['step']}, predicted {data['predicted']:.3f} "
                f"({data['evaluations']} cuts measured)",
            )
        elif event == "trial_end":
            r = data["record"]
            progress.advance(task_id)
            if r["state"] != "complete":
                progress.console.print(f"  trial {r['trial']}: [red]failed[/] {escape(str(r.get('error')))}")
                return
            ratio = r.get("ratio")
            best = data.get("best_accuracy")
            progress.console.print(
                f"  trial {r['trial']}: acc {100 * r['accuracy']:.1f}%  ratio {ratio:.3f}  MACs {r['flops_ratio']:.2f}  "
                f"{'[green]accepted[/]' if r.get('accepted') else '[dim]rejected[/]'}"
                + (f"  best {100 * best:.1f}%" if best is not None else "")
            )

    return on_event


@app.command()
def search(
    model: ModelArg = None,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="digits (built-in), an ImageFolder PATH, cifar10:PATH, cifar100:PATH, npz:FILE, "
            "fashion-mnist (Debian's dataset-fashion-mnist package), fashion-mnist:DIR or mnist:DIR "
            "(the four IDX files).",
        ),
    ] = "digits",
    train_samples: Annotated[
        int | None,
        typer.Option(
            "--train-samples",
            min=1,
            help="Train on a stratified, seeded subset of about this many training images (validation "
            "and test splits are untouched); default: all.",
        ),
    ] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    input_shape: InputShapeOpt = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="knapsack (the default: latency saliency as HALP, here the loss path below with removable "
            "residual branches, placed on the budget as deployed, one trial, the search's epochs in the final "
            "fine-tune), anneal (CONetV2 metric + simulated annealing), dmasking (FBNetV2 channel-masking "
            "supernet with a latency-predictor cost), or the baselines l1 (uniform widths, top-L1 channels of "
            "the original) | scratch (uniform widths, re-initialized; 'uniform' is its old name) | random.",
        ),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            "--start",
            help="The first widths. anneal: uniform (one factor for every group, what l1 proposes) or knapsack "
            "(latency saliency, as HALP: the channels with the most Taylor importance per predicted latency). "
            "knapsack: uniform (the uniform widths on the budget, the budget they leave spent by latency "
            "saliency) or smallest (HALP's own fill from every group's minimum: on Fashion-MNIST it starved the "
            "first stages at a 0.5 budget). Default: uniform.",
        ),
    ] = None,
    importance: Annotated[
        str | None,
        typer.Option(
            "--importance",
            help="What the latency saliency (knapsack, anneal --start knapsack) keeps per unit of latency: taylor "
            "(first-order Taylor of the original on the validation split, channel by channel) or loss (each "
            "group's validation loss measured with it cut to each of its widths, the others whole; ~2.5 s per "
            "width for ResNet-20 on 2 cores, before the first trial; saved in the run directory for --resume) or path "
            "(from the whole network, one group cut per step, the cut that loses the least validation loss per "
            "predicted latency saved, every cut measured where the steps before left the network: interactions "
            "count; the knapsack's --start does not apply; also saved for --resume). Default: path for knapsack, "
            "taylor for anneal --start knapsack.",
        ),
    ] = None,
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            "--latency-budget",
            help="The budget on the --budget-on quantity, as a ratio of the original's (0.5), or in "
            "milliseconds (12ms, latency only). --latency-budget is its old name.",
        ),
    ] = "0.5",
    budget_on: Annotated[
        str,
        typer.Option(
            "--budget-on",
            help="What --budget limits: latency (measured as deployed with onnxruntime), flops (MACs) or "
            "params.",
        ),
    ] = "latency",
    provider: Annotated[
        str,
        typer.Option(
            "--provider",
            help="onnxruntime provider: auto (TensorRT, else CUDA, else CPU) | cpu | cuda | tensorrt.",
        ),
    ] = "auto",
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="onnxruntime intra-op threads your deployment uses; the budget is met at this count "
            "(0: onnxruntime's default, the physical cores). The report also gives 1 thread.",
        ),
    ] = 0,
    ort_config: OrtConfigOpt = None,
    remote: TargetOpt = None,
    token: TokenOpt = None,
    latency_seconds: Annotated[
        float,
        typer.Option(
            "--latency-seconds",
            min=0.0,
            help="Timing cap of one in-loop latency measurement; a measurement as deployed (reachability, "
            "confirmation, final check) runs each process a quarter of it (at least 0.25 s). 0 (a flops or "
            "params budget only): trials are not timed; best.onnx still is, as deployed.",
        ),
    ] = 2.0,
    deployed_pairs: Annotated[
        int,
        typer.Option(
            "--deployed-pairs",
            min=1,
            help="Process pairs of a measurement as deployed (reachability, choosing the trial to finish, the "
            "final check); up to twice as many are taken while they disagree by more than 10 %.",
        ),
    ] = 4,
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials",
            min=1,
            help="Candidates to train and measure. Default: 1 for knapsack, l1 and scratch (their widths are "
            "placed as deployed before training; more trials train the same widths again), 12 for the others.",
        ),
    ] = None,
    epochs_per_trial: Annotated[
        int, typer.Option("--epochs-per-trial", help="Fine-tuning epochs per candidate.")
    ] = 1,
    final_epochs: Annotated[
        int | None,
        typer.Option(
            "--final-epochs",
            min=0,
            help="Fine-tuning epochs of the best. Default: 15 for knapsack, l1 and scratch (what their one trial "
            "leaves of the others' 12 trials + 4), 4 for the others.",
        ),
    ] = None,
    final_from: Annotated[
        str,
        typer.Option(
            "--final-from",
            help="Where the best widths' fine-tuning starts: trial (the best trial's trained weights) or "
            "original (cut afresh from the original: compares strategies' widths at equal training; the "
            "search then only ranks widths, so every trial is cut from the original and trained on the "
            "same batches).",
        ),
    ] = "trial",
    pretrain_epochs: Annotated[
        int,
        typer.Option(
            "--pretrain-epochs",
            help="Training of the original when no --weights are given (it becomes the teacher).",
        ),
    ] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate (cosine schedule).")] = 0.05,
    min_ratio: Annotated[
        float, typer.Option("--min-ratio", help="Smallest width of a group, as a share of its channels.")
    ] = 0.125,
    align: Annotated[
        int,
        typer.Option(
            "--align",
            help="Widths in multiples of this wherever a group's width allows (CPU kernels run fastest on "
            "multiples of 8/16; a narrow group that is no multiple of it moves channel by channel).",
        ),
    ] = 8,
    depth: Annotated[
        bool | None,
        typer.Option(
            "--depth/--no-depth",
            help="Let a group whose residual branch can be removed take width 0 (the branch and its nodes "
            "go; `inspect` marks these groups): at low latency budgets a node's fixed cost decides what fits. "
            "Default: on for knapsack, off for the others (dmasking: the option 0 fades the branch out in its "
            "supernet).",
        ),
    ] = None,
    resolutions: Annotated[
        str | None,
        typer.Option(
            "--resolutions",
            help="dmasking only: also search the square input size among these (e.g. 24,28,32); the budget "
            "stays relative to the original at its own input; best.onnx takes the chosen size.",
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run directory (history, checkpoints, best.onnx, report).")
    ] = Path("runs/search"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out without redoing finished trials.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="Worker processes on this machine training trials in parallel, on a shared study (--storage); "
            "more join from other machines with `onnxconet worker`. Latency is measured by one worker at a "
            "time, the others paused.",
        ),
    ] = 1,
    storage: StorageOpt = None,
    study: StudyOpt = None,
    heartbeat: HeartbeatOpt = 10.0,
    torch_threads: TorchThreadsOpt = 0,
    nproc_per_trial: Annotated[
        int,
        typer.Option(
            "--nproc-per-trial",
            min=1,
            help="Data-parallel processes per training (each trial's fine-tune, dmasking's supernet): "
            "torch.distributed on this machine, gloo on CPU, NCCL on CUDA (one GPU each). --batch-size is the "
            "global batch; the result is the one process's up to float rounding.",
        ),
    ] = 1,
    device: Annotated[
        str | None, typer.Option("--device", help="Training device: auto | cpu | cuda.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Search the channel width of every group: candidates inherit the original's weights, are fine-tuned with
    distillation, scored by accuracy against measured latency; the best is fine-tuned and written as
    OUT/best.onnx with a report. With no arguments: the built-in digits CNN on digits, budget 0.5."""
    from onnxconet.commands.search import SearchConfig, run_search
    from onnxconet.latency.profile import parse_session_config
    from onnxconet.load import parse_input_shape
    from onnxconet.search.resolution import parse_resolutions

    cfg = SearchConfig(
        model=model,
        data=data,
        train_samples=train_samples,
        weights=weights_arg(weights, pretrained),
        input_shape=_run(parse_input_shape, input_shape),
        strategy=strategy,
        start=start,
        importance=importance,
        budget=budget,
        budget_on=budget_on,
        provider=provider,
        threads=threads,
        ort_config=_run(parse_session_config, ort_config),
        latency_target=connect_target(remote, token),
        latency_seconds=latency_seconds,
        deployed_pairs=deployed_pairs,
        trials=trials,
        epochs_per_trial=epochs_per_trial,
        final_epochs=final_epochs,
        final_from=final_from,
        pretrain_epochs=pretrain_epochs,
        batch_size=batch_size,
        lr=lr,
        min_ratio=min_ratio,
        align=align,
        depth=depth,
        out=str(out_dir),
        resume=resume,
        seed=seed,
        device=device,
        resolutions=_run(parse_resolutions, resolutions),
        workers=workers,
        storage=storage,
        study=study,
        heartbeat=heartbeat,
        torch_threads=torch_threads,
        nproc_per_trial=nproc_per_trial,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("preparing", total=trials)
        result = _run(run_search, cfg, _renderer(progress, task))
    if json_out:
        print(json.dumps(result.to_json()))
        return
    _print_result(result, Path(cfg.out))


def _print_result(result, out_dir: Path) -> None:
    from onnxconet.report import noise_note, threads_note

    b, base, budget = result.best, result.baseline, result.budget
    out.print(
        f"[bold]best[/] (trial {b.trial}): accuracy {100 * b.accuracy:.1f}% (baseline {100 * base.accuracy:.1f}%), "
        f"latency {b.latency_ms:.2f} ms = {b.latency_ratio:.3f}× the baseline ({b.speedup:.2f}× faster), "
        f"MACs {b.flops_ratio:.2f}×, params {b.params_ratio:.2f}×; budget {budget.on} ≤ {budget.ratio:.3f}: "
        + ("[green]met[/]" if b.budget_met else "[red]not met[/]")
        + (" as deployed" if budget.on == "latency" else "")
    )
    lat = b.latency.to_json() if b.latency else {}
    for note in (noise_note(lat, budget.ratio) if budget.on == "latency" else "", threads_note(lat)):
        if note:
            out.print(note, highlight=False)
    searched = result.config.get("resolutions")
    out.print(
        (
            f"input resolution {result.resolution}x{result.resolution} (searched over {searched}); "
            if result.resolution
            else ""
        )
        + f"wrote {b.onnx} (onnxruntime vs torch max |diff| {b.max_abs_diff:.1e}), "
        f"{out_dir / 'report.md'}, {out_dir / 'result.json'}"
    )
