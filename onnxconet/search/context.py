"""The run context: everything a search run has prepared before its first trial, in one frozen object that every
step of the run takes as its first argument (`ctx`) instead of a long list of arguments.

`build_context` does the preparation in the order a user sees it: export the model and read its channel
groups (and, for `--resolutions`, the exports at every resolution), load the data, pretrain the original when no
weights were given (it becomes the teacher), write baseline.onnx, measure the baseline's latency as deployed,
and turn the budget into a ratio. Use the context as a `with` block: it holds the runner processes that time
candidates against the baseline for the whole search.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from onnxconet import faults
from onnxconet.data import load_data, make_loaders
from onnxconet.errors import OnnxconetError
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.ir import save_onnx
from onnxconet.latency.gate import run_gate
from onnxconet.latency.profile import measure
from onnxconet.prepare import Prepared, prepare
from onnxconet.search.config import Budget, SearchConfig, config_json, parse_budget
from onnxconet.search.driver import atomic_save, load_checkpoint
from onnxconet.search.judge import LatencyJudge
from onnxconet.search.resolution import Resolution, graphs_at
from onnxconet.search.results import Baseline
from onnxconet.surgery.parity import onnx_with_weights
from onnxconet.train.loop import TrainConfig, evaluate, fit

log = logging.getLogger(__name__)
Progress = Callable[[str, dict], None]


@dataclass(frozen=True)
class Loaders:
    """The data: train (shuffled, seeded), validation (ranks trials), test (reported only; None if absent)."""

    train: object
    val: object
    test: object | None


@dataclass(frozen=True)
class RunContext:
    """What every step of a search run reads (see the module docstring). Frozen: a step that changes what the
    trials run on (a strategy's `Setup`) says so in its own return value."""

    cfg: SearchConfig
    out: Path
    prep: Prepared
    loaders: Loaders
    train: TrainConfig
    teacher: nn.Module
    baseline: Baseline
    judge: LatencyJudge
    budget: Budget
    progress: Progress | None = None
    resolutions: list[Resolution] | None = None

    @property
    def cg(self) -> ChannelGraph:
        return self.prep.graph

    def emit(self, event: str, **data) -> None:
        if self.progress:
            self.progress(event, data)

    def stage(self, text: str) -> None:
        """A line of progress (the CLI prints it)."""
        self.emit("stage", text=text)

    def train_progress(self, data: dict) -> None:
        self.emit("train", **data)

    def close(self) -> None:
        self.judge.close()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def history_header(ctx: RunContext) -> dict:
    """history.jsonl's first line for the run: its config, the model's fingerprint, the budget."""
    return {"kind": "header", "config": config_json(ctx.cfg), "fingerprint": ctx.cg.fingerprint(),
            "budget": ctx.budget.ratio}  # fmt: skip


def _emitter(progress: Progress | None) -> Callable[[str], None]:
    return lambda text: progress("stage", {"text": text}) if progress else None


@dataclass(frozen=True)
class KnownBaseline:
    """What the run's first process measured of the original (latency as deployed, accuracies): a worker joining
    a study (search/parallel.py) takes it instead of measuring again while the others train."""

    ms: float
    accuracy: float
    test_accuracy: float | None


def build_context(
    cfg: SearchConfig, progress: Progress | None = None, known: KnownBaseline | None = None
) -> RunContext:
    """Prepare a run (module docstring). Raises OnnxconetError with one line on bad input."""
    cfg.check()
    stage = _emitter(progress)
    out = Path(cfg.out)
    history = out / "history.jsonl"
    if history.is_file() and history.stat().st_size and not cfg.resume:
        raise OnnxconetError(f"{history} exists: pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    stage("exporting the model and reading its channel groups")
    prep = prepare(cfg.model, cfg.weights, cfg.input_shape)
    if prep.loaded.module is None:
        raise OnnxconetError(
            f"{prep.loaded.spec}: search needs the torch model (a .py:factory or torchvision spec), "
            "not an ONNX file"
        )
    resolutions = graphs_at(prep, cfg.resolutions) if cfg.resolutions else None  # fails before any training
    faults.point("exported")
    loaders = _loaders(cfg, prep)
    tcfg = TrainConfig(
        epochs=cfg.epochs_per_trial, lr=cfg.lr, batch_size=cfg.batch_size, alpha=cfg.alpha,
        temperature=cfg.temperature, max_batches=cfg.max_batches, seed=cfg.seed,
    )  # fmt: skip
    teacher = _teacher(cfg, prep.loaded.module, loaders, tcfg, progress)
    if known is not None:
        baseline = Baseline(known.accuracy, known.test_accuracy, onnx=str(out / "baseline.onnx"))
    else:
        baseline = Baseline(
            accuracy=evaluate(teacher, loaders.val, device=cfg.device, max_batches=cfg.max_batches)[
                "accuracy"
            ],
            test_accuracy=evaluate(teacher, loaders.test, device=cfg.device)["accuracy"]
            if loaders.test
            else None,
            onnx=str(out / "baseline.onnx"),
        )
    if known is None:  # (a joining worker reads the first process's file: the reference of every measurement)
        save_onnx(onnx_with_weights(prep.onnx_model, teacher.state_dict()), baseline.onnx)
        faults.point("baseline.onnx written")
    target = cfg.target()
    judge = LatencyJudge(baseline.onnx, target, cfg.latency_seconds, pairs=cfg.deployed_pairs)
    if cfg.workers > 1:  # the other workers start up meanwhile (parallel.local_workers): measure alone
        judge.gate = run_gate(out, cfg.latency_target)
    try:
        if known is None:
            stage(f"measuring the baseline's latency as deployed ({target.describe()})")
            seconds = max(2 * cfg.latency_seconds, 0.5)  # (0: trials untimed; the baseline still is)
            with judge.alone():
                base_ms = measure(baseline.onnx, target, max_seconds=seconds).median_ms
        else:
            base_ms = known.ms
        ratio, ms = parse_budget(cfg.budget, cfg.budget_on, base_ms)
    except BaseException:
        judge.close()
        raise
    return RunContext(
        cfg=cfg, out=out, prep=prep, loaders=loaders, train=tcfg, teacher=teacher, baseline=baseline,
        judge=judge, budget=Budget(cfg.budget_on, ratio, ms), progress=progress, resolutions=resolutions,
    )  # fmt: skip


def _loaders(cfg: SearchConfig, prep: Prepared) -> Loaders:
    cg = prep.graph
    n_classes = (cg.graph.shape(cg.graph.outputs[0]) or (0,))[-1]
    splits = load_data(
        cfg.data, prep.loaded.input_shape, seed=cfg.seed, num_classes=n_classes or None,
        train_samples=cfg.train_samples,
    )  # fmt: skip
    return Loaders(*make_loaders(splits, cfg.batch_size, cfg.seed))


def _teacher(
    cfg: SearchConfig, module: nn.Module, loaders: Loaders, tcfg: TrainConfig, progress
) -> nn.Module:
    """The original as the trials' teacher: the given weights, or teacher.pt of a resumed run, or trained now for
    --pretrain-epochs (and saved to teacher.pt)."""
    teacher = copy.deepcopy(module)
    if cfg.weights:
        return teacher.eval()
    path = Path(cfg.out) / "teacher.pt"
    ckpt = load_checkpoint(path) if cfg.resume else None
    stage = _emitter(progress)
    if ckpt is not None:
        teacher.load_state_dict(ckpt)
        stage("pretrained teacher restored")
        return teacher.eval()
    if cfg.pretrain_epochs > 0:
        stage(f"pretraining the original for {cfg.pretrain_epochs} epochs (no --weights given)")
        with faults.phase("pretrain"):
            fit(
                teacher,
                loaders.train,
                replace(tcfg, epochs=cfg.pretrain_epochs, alpha=0.0),
                val_loader=loaders.val,
                device=cfg.device,
                progress=(lambda d: progress("train", d)) if progress else None,
            )
        atomic_save(teacher.state_dict(), path)
        faults.point("teacher saved")
    return teacher.eval()
