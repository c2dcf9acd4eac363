"""Evaluate one width configuration: cut it from the weight bank, fine-tune with distillation, score its
layers (CONetV2's QC per group), measure its latency against the baseline, count FLOPs and params."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch
from torch import nn

from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.latency.profile import PairedMeasurer, RelativeStats, Target, measure_isolated
from onnxconet.metrics.conet import weight_metrics
from onnxconet.search.base import Trial, TrialState
from onnxconet.surgery.inherit import WeightBank
from onnxconet.surgery.onnx import slice_onnx
from onnxconet.train.loop import TrainConfig, evaluate, fit, recalibrate_bn

log = logging.getLogger(__name__)


class LatencyJudge:
    """Latency of candidates relative to the baseline ONNX, at the deployment's target.

    `measure` is the in-loop estimate every trial takes: a `PairedMeasurer` whose runner processes hold the
    baseline for the whole search (started on first use); a measurement that other programs disturbed is taken
    again (up to twice; the median of what was taken). `reference_ms` keeps the baseline's latency measured
    beside every candidate: when it moves, the machine's speed changed during the search (see `drift`).
    `deployed` is the ratio as deployed (`measure_isolated`: each model alone in fresh processes, pairs added up
    to twice `pairs` while they disagree), for the decisions a search takes on one figure: whether the budget
    is reachable, which trial to finish, whether the result met the budget.
    """

    def __init__(self, reference: bytes | str, target: Target, max_seconds: float = 2.0, pairs: int = 4):
        self.reference, self.target, self.max_seconds, self.pairs = reference, target, max_seconds, pairs
        self._measurer: PairedMeasurer | None = None
        self.reference_ms: list[float] = []

    @property
    def measurer(self) -> PairedMeasurer:
        if self._measurer is None:
            self._measurer = PairedMeasurer(self.reference, self.target)
        return self._measurer

    def measure(self, candidate: onnx.ModelProto | bytes) -> tuple[float, float]:
        """(ratio to the baseline, candidate median ms), the in-loop way."""
        src = candidate.SerializeToString() if isinstance(candidate, onnx.ModelProto) else candidate
        rel = _undisturbed(lambda: self.measurer.compare(src, max_seconds=self.max_seconds))
        self.reference_ms.append(rel.reference.median_ms)
        return rel.ratio, rel.candidate.median_ms

    def drift(self) -> dict | None:
        """How far the baseline's own latency moved over the in-loop measurements: {"min_ms", "max_ms",
        "spread" (max / min - 1), "measurements"}, or None before two measurements."""
        if len(self.reference_ms) < 2:
            return None
        lo, hi = min(self.reference_ms), max(self.reference_ms)
        return {"min_ms": lo, "max_ms": hi, "spread": hi / lo - 1, "measurements": len(self.reference_ms)}

    def deployed(self, candidate, threads: int | None = None) -> RelativeStats:
        """The ratio as deployed (`measure_isolated`, `pairs` pairs) of `candidate` (a proto, bytes or path);
        `threads` overrides the target's thread count. Disturbed (other programs took the cores): measured again,
        up to twice, and the median of what was measured returned."""
        target = self.target if threads is None else replace(self.target, threads=threads)
        src = candidate.SerializeToString() if isinstance(candidate, onnx.ModelProto) else candidate
        seconds = max(0.25, self.max_seconds / 4)  # per process: 0.5 s at the default 2 s
        kw = dict(pairs=self.pairs, max_pairs=2 * self.pairs, seconds=seconds)
        return _undisturbed(lambda: measure_isolated(src, self.reference, target, **kw))

    def close(self) -> None:
        if self._measurer is not None:
            self._measurer.close()
            self._measurer = None


def _undisturbed(measure: Callable[[], RelativeStats], tries: int = 3) -> RelativeStats:
    """`measure()`, again while other programs disturbed it (up to `tries` in all); the run with the median
    ratio of those taken."""
    runs = [measure()]
    while runs[-1].disturbed and len(runs) < tries:
        runs.append(measure())
    return sorted(runs, key=lambda r: r.ratio)[len(runs) // 2]


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
    base_flops: int = field(init=False)
    base_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.base_flops = max(count_flops(self.cg), 1)
        self.base_params = max(count_params(self.cg), 1)

    def cut(self, widths: dict[int, int]):
        keep = self.cg.keep_mask(widths, self.bank.scores(self.cg))
        slices = self.cg.param_slices(keep)
        return keep, slices, self.bank.cut(slices)

    def run(
        self, number: int, widths: dict[int, int], epochs: int | None = None
    ) -> tuple[Trial, nn.Module, dict]:
        """Train and measure one candidate; returns (trial, fine-tuned module, slices)."""
        t0 = time.perf_counter()
        keep, slices, model = self.cut(widths)
        flops, params = count_flops(self.cg, keep), count_params(self.cg, keep)
        latency_ratio = latency_ms = None
        if self.judge is not None:
            latency_ratio, latency_ms = self.judge.measure(slice_onnx(self.cg, keep))
        cfg = self.train_cfg if epochs is None else _with_epochs(self.train_cfg, epochs)
        if self.same_batches:
            reseed_loader(self.train_loader, cfg.seed)
        recalibrate_bn(model, self.train_loader, batches=10, device=self.device)
        per_epoch: list[dict[int, float]] = []
        fit(
            model,
            self.train_loader,
            cfg,
            teacher=self.teacher,
            device=self.device,
            progress=self.progress,
            epoch_callback=(lambda _e, m: per_epoch.append(self.group_metrics(m)))
            if self.metric == "qc"
            else None,
        )
        acc = evaluate(model, self.val_loader, device=self.device)["accuracy"]
        metrics = {g: max(e.get(g, 0.0) for e in per_epoch) for g in per_epoch[0]} if per_epoch else {}
        ratio = {
            "latency": latency_ratio,
            "flops": flops / self.base_flops,
            "params": params / self.base_params,
        }[self.on]
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
        )
        return trial, model, slices

    def group_metrics(self, model: nn.Module) -> dict[int, float]:
        """CONetV2 per group: mean of its producers' output-unfolding QC and consumers' input-unfolding QC."""
        state = model.state_dict()
        weights = {
            m.param: state[m.param].detach().cpu().numpy()
            for m in self.cg.members.values()
            if m.role in ("producer", "consumer") and m.param in state and state[m.param].dim() >= 2
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
