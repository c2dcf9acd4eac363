"""Evaluate one width configuration: cut it from the weight bank, fine-tune with distillation, score its
layers (CONetV2's QC per group), measure its latency against the baseline (`judge.LatencyJudge`), count FLOPs
and params."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.metrics.conet import weight_metrics
from onnxconet.search.base import Trial, TrialState, widths_key
from onnxconet.search.judge import LatencyJudge
from onnxconet.search.ranks import Ranks
from onnxconet.search.resolution import ResizedLoader
from onnxconet.surgery.inherit import WeightBank
from onnxconet.surgery.onnx import slice_onnx
from onnxconet.train.loop import TrainConfig, evaluate, fit, recalibrate_bn

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    """Everything a trial needs. `on` is the budgeted quantity: latency | flops | params."""

    cg: ChannelGraph
    bank: WeightBank
    teacher: nn.Module
    train_loader: object
    val_loader: object
    train_cfg: TrainConfig
    judge: LatencyJudge | None
    on: str = "latency"
    device: str | None = None
    metric: str = "qc"
    progress: Callable[[dict], None] | None = None
    same_batches: bool = False  # every trial trains on the same batches in the same order (paired comparison)
    # held around the compute between batches (the layer metric): with several workers on one machine, the
    # gate that keeps another worker's latency measurement alone (latency/gate.py)
    busy: Callable[[], AbstractContextManager] = nullcontext
    ranks: Ranks | None = None  # --nproc-per-trial: fine-tunes on that many processes (search/ranks.py)
    # {widths_key: latency ratio} measured as deployed before training (`Strategy.as_deployed`): a trial of those
    # widths is judged by that figure, not by its rougher in-loop one (which read up to +0.004 over a placement
    # measured at 0.290 as deployed); `latency_ratio` keeps the in-loop figure
    as_deployed: dict = field(default_factory=dict)
    base_flops: int = field(init=False)
    base_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.base_flops = max(count_flops(self.cg), 1)
        self.base_params = max(count_params(self.cg), 1)

    def at_resolution(self, res) -> None:
        """Run the trials at `res` (a `search.resolution.Resolution`, dmasking's spatial search): cut from its
        graph, batches resized to it; FLOPs and params ratios stay relative to the baseline at its own input."""
        self.cg = res.cg
        self.train_loader = ResizedLoader(self.train_loader, res.size)
        self.val_loader = ResizedLoader(self.val_loader, res.size)

    def cut(self, widths: dict[int, int]):
        keep = self.cg.keep_mask(widths, self.bank.scores(self.cg))
        slices = self.cg.param_slices(keep)
        return keep, slices, self.bank.cut(slices)

    def run(
        self, number: int, widths: dict[int, int], epochs: int | None = None
    ) -> tuple[Trial, nn.Module, dict]:
        """Train and measure one candidate; returns (trial, fine-tuned module, slices)."""
        t0 = time.perf_counter()
        clock = _Phases()
        keep, slices, model = self.cut(widths)
        flops, params = count_flops(self.cg, keep), count_params(self.cg, keep)
        latency_ratio = latency_ms = None
        clock.lap("cut")
        if self.judge is not None:
            latency_ratio, latency_ms = self.judge.measure(slice_onnx(self.cg, keep))
        clock.lap("measure")
        cfg = self.train_cfg if epochs is None else _with_epochs(self.train_cfg, epochs)
        # the same batches for every trial (a paired comparison), else each trial's own: a resumed run trains
        # trial n on the batches an uninterrupted run would have
        reseed_loader(self.train_loader, cfg.seed if self.same_batches else trial_seed(cfg.seed, number))
        recalibrate_bn(model, self.train_loader, batches=10, device=self.device)
        per_epoch = self._fine_tune(model, slices, cfg)
        clock.lap("train")
        acc = evaluate(model, self.val_loader, device=self.device)["accuracy"]
        clock.lap("evaluate")
        metrics = {g: max(e.get(g, 0.0) for e in per_epoch) for g in per_epoch[0]} if per_epoch else {}
        ratio = {
            "latency": latency_ratio,
            "flops": flops / self.base_flops,
            "params": params / self.base_params,
        }[self.on]
        if self.on == "latency":
            ratio = self.as_deployed.get(widths_key(widths), ratio)
        trial = Trial(
            number,
            dict(widths),
            TrialState.COMPLETE,
            accuracy=acc,
            ratio=ratio,
            latency_ms=latency_ms,
            latency_ratio=latency_ratio,
            params=params,
            flops=flops,
            flops_ratio=flops / self.base_flops,
            params_ratio=params / self.base_params,
            seconds=time.perf_counter() - t0,
            metrics=metrics,
            extra={"phase_seconds": clock.laps},
        )
        return trial, model, slices

    def _fine_tune(self, model: nn.Module, slices, cfg: TrainConfig) -> list[dict[int, float]]:
        """Fine-tune `model` in place (on `ranks.nproc` processes when set); the layer metric after each epoch
        when the strategy reads it."""
        per_epoch: list[dict[int, float]] = []
        if self.ranks is None or self.ranks.nproc <= 1:
            every = (lambda _e, m: per_epoch.append(self._busy_metrics(m))) if self.metric == "qc" else None
            fit(model, self.train_loader, cfg, teacher=self.teacher, device=self.device, progress=self.progress,
                epoch_callback=every)  # fmt: skip
            return per_epoch
        states = self.ranks.fit(
            model, slices, self.train_loader, cfg, self.teacher, self.device, self.metric == "qc"
        )
        final = {k: v.clone() for k, v in model.state_dict().items()}
        # the layer metric of each epoch's weights, as the callback above reads them
        for epoch_state in states:
            model.load_state_dict(epoch_state)
            per_epoch.append(self._busy_metrics(model))
        model.load_state_dict(final)
        return per_epoch

    def _busy_metrics(self, model: nn.Module) -> dict[int, float]:
        with self.busy():
            return self.group_metrics(model)

    def group_metrics(self, model: nn.Module) -> dict[int, float]:
        """CONetV2 per group: mean of its producers' output-unfolding QC and consumers' input-unfolding QC."""
        state = model.state_dict()
        weights = {
            m.param: state[m.param].detach().cpu().numpy()
            for m in self.cg.members.values()
            if m.role in ("producer", "consumer")
            and m.param in state
            and state[m.param].dim() >= 2
            and state[m.param].numel()  # a removed branch's layers (--depth) have no weights to score
        }
        metrics, _errors = weight_metrics(weights)
        sums: dict[int, list[float]] = {}
        for m in self.cg.members.values():
            if m.param not in metrics or m.role not in ("producer", "consumer"):
                continue
            q = metrics[m.param]["out" if m.role == "producer" else "in"].qc
            for gid in np.unique(self.cg.group_of_bundle[self.cg.bundle_of_id[m.ids]]).tolist():
                sums.setdefault(gid, []).append(q)
        return {g: float(np.mean(v)) for g, v in sums.items() if self.cg.groups[g].prunable}


class _Phases:
    """Wall seconds of a trial's phases (cut, measure, train with the metric, evaluate): where the time goes."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


def trial_seed(seed: int, number: int) -> int:
    """The shuffle seed of trial `number` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def reseed_loader(loader, seed: int) -> None:
    """Restart a shuffling loader's order: the next pass yields the same batches as the first."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


def _with_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    return replace(cfg, epochs=epochs)


def failed_trial(number: int, widths: dict[int, int], error: BaseException, seconds: float) -> Trial:
    msg = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    log.warning("trial %d failed: %s", number, msg)
    return Trial(number, dict(widths), TrialState.FAILED, seconds=seconds, error=msg)
