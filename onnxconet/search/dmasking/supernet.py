"""dmasking's phase 1: training the supernet (the original at full width, channel masks from per-group logits)
once, before the first trial; the package docstring says what is trained and why.

Phase 1 is apart from the strategy because it is a training run, not a search step: it owns the weights and
logits optimizers, the per-epoch checkpoint that makes it resumable, and returns everything the derivation
needs (`SupernetResult`); the strategy never sees an optimizer. The weights use the training loop's SGD and
cosine schedule (`train.loop.make_optimizer`, `lr_at`), per step over the whole supernet training.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from onnxconet.errors import OnnxconetError
from onnxconet.files import atomic_save
from onnxconet.graph.groups import ChannelGraph
from onnxconet.search.dmasking.config import DMaskingConfig
from onnxconet.search.dmasking.cost import DMaskingCost
from onnxconet.search.dmasking.step import SearchStep, search_step
from onnxconet.search.driver import load_checkpoint
from onnxconet.search.masks import Supernet
from onnxconet.search.ranks import PortableModule
from onnxconet.surgery.inherit import WeightBank
from onnxconet.train import ddp
from onnxconet.train.loop import TrainConfig, lr_at, make_optimizer, resolve_device

log = logging.getLogger(__name__)
CHECKPOINT = "dmasking.pt"


@dataclass(frozen=True)
class SupernetJob:
    """What the strategy asks of phase 1: its channel graph (the base export), width options per group,
    epochs, seed (data split, loaders' order, Gumbel noise) and the cost the logits pay."""

    cg: ChannelGraph
    options: dict[int, list[int]]
    epochs: int
    seed: int
    config: DMaskingConfig
    cost: DMaskingCost


@dataclass
class SupernetResult:
    """What phase 1 leaves for the derivation.

    Attributes:
        logits: final logits per searched group.
        final_tau: the temperature after the last epoch (the derivation's sampling default).
        res_logits: final logits over the searched resolutions (None without).
        history: one snapshot per epoch (epoch 0: before training): τ, probabilities, logits, expected and
            argmax cost (result.json's `logits_history`).
        summary: result.json's `dmasking` entry.
        model: the trained supernet's weights (full width, masks detached).
        scores: the keep order, the original's L1 (the staircase the masks followed).
    """

    logits: dict[int, np.ndarray]
    final_tau: float
    res_logits: np.ndarray | None = None
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    model: nn.Module | None = None
    scores: np.ndarray | None = None


class RankedBank(WeightBank):
    """A weight bank whose keep order is fixed (the supernet's staircase order), not re-read from its weights:
    a derived width then keeps exactly the channels the staircase kept alive the longest."""

    def __init__(self, module: nn.Module, scores: np.ndarray) -> None:
        super().__init__(module)
        self._scores = np.asarray(scores, dtype=np.float64).copy()

    def scores(self, cg: ChannelGraph) -> np.ndarray:
        return self._scores


@dataclass
class _Data:
    """The two disjoint seeded splits of the training data: weights steps and logits steps."""

    dataset: object
    w_idx: np.ndarray
    a_idx: np.ndarray
    batch_size: int
    max_batches: int | None
    device: torch.device
    rank: ddp.Rank | None = None  # data-parallel: this rank's shard of each global batch

    def loader(self, idx: np.ndarray, seed: int) -> DataLoader:
        loader = DataLoader(
            Subset(self.dataset, idx.tolist()),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=len(idx) > self.batch_size,
        )
        return loader if self.rank is None else ddp.shard_loader(loader, self.rank)


@dataclass
class _Training:
    """What the epochs of one supernet training share (as `train.loop._Run` for a fine-tune)."""

    job: SupernetJob
    step: SearchStep
    data: _Data
    train: TrainConfig
    emit: Callable[[str], None]
    checkpoint: Path | None  # None: config.checkpoint is off
    total_steps: int
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    seconds: float = 0.0

    @property
    def rank(self) -> ddp.Rank | None:
        return self.data.rank

    def tau(self, epoch: int) -> float:
        c = self.job.config
        return c.tau0 * c.tau_decay**epoch


def split(dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights indices, logits indices): a seeded permutation, `fraction` of it for the logits (>= 1
    each)."""
    n = len(dataset)
    perm = np.random.default_rng(seed).permutation(n)
    n_arch = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(perm[n_arch:]), np.sort(perm[:n_arch])


@dataclass(frozen=True)
class SupernetEnv:
    """What phase 1 takes from the run. With `--nproc-per-trial N` it travels to N processes by pickling, the
    teacher as a `PortableModule` (a model defined in a user's file cannot be unpickled in another process)."""

    teacher: nn.Module | PortableModule
    train: TrainConfig
    dataset: object
    batch_size: int
    device: str | None
    out: Path
    resume: bool

    @classmethod
    def of(cls, ctx) -> SupernetEnv:
        loader = ctx.loaders.train
        return cls(
            ctx.teacher,
            ctx.train,
            loader.dataset,
            loader.batch_size or 64,
            ctx.cfg.device,
            ctx.out,
            ctx.cfg.resume,
        )


def train_supernet(ctx, job: SupernetJob) -> SupernetResult:
    """Phase 1, from the original's weights (`WeightBank(ctx.teacher)`), resumable per epoch from
    `ctx.out / CHECKPOINT` when the run resumes; data-parallel over `--nproc-per-trial` processes
    (`train.ddp`: the same supernet as one process at the same global batch).

    Args:
        ctx: the run's `RunContext` (teacher, training loader and config, device, out, resume, progress).
    """
    env, n = SupernetEnv.of(ctx), ctx.cfg.nproc_per_trial

    def emit(text: str) -> None:
        log.info("dmasking: %s", text)
        ctx.stage(text)

    if n <= 1:
        return _train(env, job, emit)
    emit(f"training the supernet on {n} processes (torch.distributed, global batch {env.batch_size})")
    device = str(resolve_device(env.device))
    portable = replace(env, teacher=PortableModule.of(env.teacher, ctx.prep.loaded))
    result = ddp.launch(_train_rank, n, portable, job, device=device, threads=ctx.cfg.torch_threads)
    model = copy.deepcopy(env.teacher).cpu()  # the weights came back as a state dict (see _train_rank)
    model.load_state_dict(result.model)
    result.model = model
    return result


def _train_rank(r: ddp.Rank, env: SupernetEnv, job: SupernetJob) -> SupernetResult | None:
    """One process of a data-parallel phase 1: rank 0 reports, checkpoints and returns the result, the model as
    its state dict (the parent process cannot unpickle a user's model class)."""

    def emit(text: str) -> None:
        if r.main:
            print(f"dmasking: {text}", file=sys.stderr, flush=True)

    result = _train(replace(env, teacher=env.teacher.build()), job, emit, r)
    if not r.main:
        return None
    result.model = {k: v.detach() for k, v in result.model.state_dict().items()}
    return result


def _train(env: SupernetEnv, job: SupernetJob, emit: Callable[[str], None], r: ddp.Rank | None = None):
    t, scores = _start(env, job, emit, r)
    net = t.step.net
    start = _restore(t, env.resume)
    net.attach()
    try:
        for epoch in range(start, job.epochs):
            _epoch(t, epoch)
    finally:
        net.detach()
    if r is not None:
        t.step.model = ddp.unsync_batchnorm(t.step.model).cpu()
    return _result(t, scores)


def _start(
    env: SupernetEnv, job: SupernetJob, emit: Callable[[str], None], r: ddp.Rank | None
) -> tuple[_Training, np.ndarray]:
    """The supernet over a copy of the original, both optimizers and the data splits; and the keep order.
    With a rank: BatchNorm over the global batch, the weights' step through DDP, the logits' gradients
    averaged, each global batch sharded."""
    c, tcfg = job.config, env.train
    device = r.device if r is not None else resolve_device(env.device)
    bank = WeightBank(env.teacher)
    scores = bank.scores(job.cg)  # the original's L1: the staircase order
    model = bank.module().to(device).train()
    if r is not None:
        model = ddp.sync_batchnorm(model, r)  # before the masks' hooks (CUDA replaces the BatchNorms)
    teacher = env.teacher.to(device).eval()
    net = Supernet(model, job.cg, job.options, scores).to(device)
    if job.cost.resolutions:  # one more logits vector: over the input resolutions
        net.logits["resolution"] = nn.Parameter(torch.zeros(len(job.cost.resolutions), device=device))
    if not net.gids:
        raise OnnxconetError(
            f"dmasking: no channel group can be masked in this model ({next(iter(net.skipped.values()), '')})"
        )
    wopt = make_optimizer(model, tcfg)
    aopt = torch.optim.Adam(net.parameters(), lr=c.arch_lr, weight_decay=c.arch_wd)
    w_idx, a_idx = split(env.dataset, c.arch_split, job.seed)
    data = _Data(env.dataset, w_idx, a_idx, env.batch_size, tcfg.max_batches, device, r)
    steps_per_epoch = min(len(data.loader(w_idx, 0)), tcfg.max_batches or 1 << 30)
    step = SearchStep(net, model, teacher, wopt, aopt, job.cost, tcfg.alpha, tcfg.temperature)
    if r is not None:
        step.forward = ddp.wrap(model, r)
        step.average = functools.partial(ddp.average_grads, r=r)
    path = env.out / CHECKPOINT if c.checkpoint else None  # every rank resumes from it, rank 0 writes it
    total = max(1, steps_per_epoch * job.epochs)
    return _Training(job, step, data, tcfg, emit, path, total), scores


def _epoch(t: _Training, epoch: int) -> None:
    """One epoch: weights and logits steps in alternation, then the epoch's snapshot and checkpoint."""
    job, s = t.job, t.step
    t0 = time.perf_counter()
    tau = t.tau(epoch)
    frozen = epoch < int(round(job.config.warmup * job.epochs))
    gen = torch.Generator().manual_seed(job.seed * 100003 + epoch)
    wl = t.data.loader(t.data.w_idx, job.seed * 7919 + 2 * epoch)
    arch = _Cycle(t.data.loader(t.data.a_idx, job.seed * 7919 + 2 * epoch + 1), t.data.device)
    sums = {"loss": 0.0, "arch": 0.0, "ratio": 0.0, "n": 0, "na": 0}
    for x, y in islice(wl, t.data.max_batches):
        x, y = x.to(t.data.device), y.to(t.data.device, dtype=torch.long)
        for group in s.wopt.param_groups:
            group["lr"] = lr_at(t.train, t.steps_done / t.total_steps)
        loss, aloss, ratio = search_step(s, (x, y), None if frozen else arch.next(), tau, gen)
        t.steps_done += 1
        sums["loss"] += float(loss)
        sums["n"] += 1
        if not math.isfinite(sums["loss"]):
            raise OnnxconetError(
                f"dmasking: supernet loss became NaN at epoch {epoch + 1}; lower --lr (now {t.train.lr:g})"
            )
        if aloss is None:
            continue
        sums["arch"] += float(aloss)
        sums["ratio"] += float(ratio)
        sums["na"] += 1
    s.net.set_weights(None)
    if t.rank is not None:  # the losses of the global batches: the mean over the ranks' shards
        sums["loss"], sums["arch"] = ddp.mean_over_ranks([sums["loss"], sums["arch"]], t.rank)
    t.seconds += time.perf_counter() - t0
    stats = {
        "train_loss": sums["loss"] / max(sums["n"], 1),
        "arch_loss": sums["arch"] / sums["na"] if sums["na"] else None,
        "frozen": frozen,
    }
    snap = snapshot(job, s.net, epoch + 1, t.tau(epoch + 1), stats)
    t.history.append(snap)
    t.emit(
        f"supernet epoch {epoch + 1}/{job.epochs}: loss {stats['train_loss']:.3f}, τ {tau:.2f}, "
        f"E[{job.cost.on} ratio] {snap['expected_ratio']:.3f}, argmax {snap['argmax_ratio']:.3f}"
        + (f", resolution {snap['argmax_resolution']}" if job.cost.resolutions else "")
        + (" (logits frozen)" if frozen else "")
    )
    _save(t, epoch + 1)


class _Cycle:
    """The logits steps' batches: the logits split's loader, restarted when it runs out (it is the
    smaller split)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.it = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            xa, ya = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            xa, ya = next(self.it)
        return xa.to(self.device), ya.to(self.device, dtype=torch.long)


# --------------------------------------------------------------------------------------- snapshots
def snapshot(job: SupernetJob, net: Supernet, epoch: int, tau: float, stats: dict | None) -> dict:
    """The logits' state after `epoch` epochs (one entry of the logits' history)."""
    cost, extra, res = job.cost, {}, None
    with torch.no_grad():
        probs = net.probs(tau)
        rp = None
        if cost.resolutions:
            rl = net.logits["resolution"].detach()
            rp = torch.softmax(rl / tau, dim=0)
            res = cost.resolutions[argmax_last(rl.cpu().numpy())]
            extra = {
                "resolutions": cost.sizes(),
                "resolution_logits": [round(float(v), 5) for v in rl.cpu()],
                "resolution_probs": [round(float(v), 5) for v in rp.cpu()],
                "argmax_resolution": res.size,
            }
        ratio = float(cost.expected_ratio(probs, net.options, rp))
    argmax = net.argmax_widths()
    return {
        "epoch": epoch,
        "tau": tau,
        "probs": {str(g): [round(float(v), 5) for v in p.cpu()] for g, p in probs.items()},
        "options": {str(g): list(o) for g, o in net.options.items()},
        "logits": {str(g): [round(float(v), 5) for v in net.logits[str(g)].detach().cpu()] for g in net.gids},
        "expected_ratio": ratio,
        "argmax": {str(g): w for g, w in argmax.items()},
        "argmax_ratio": cost.predict_raw(argmax, res),
        **extra,
        **(stats or {}),
    }


def argmax_last(a) -> int:
    """Index of the largest value, the last one on ties (the larger resolution, the wider option)."""
    a = np.asarray(a)
    return int(len(a) - 1 - np.argmax(a[::-1]))


def _result(t: _Training, scores: np.ndarray) -> SupernetResult:
    job, net = t.job, t.step.net
    logits = {gid: net.logits[str(gid)].detach().cpu().numpy().astype(float) for gid in net.gids}
    summary: dict = {}
    res_logits = None
    if job.cost.resolutions:
        res_logits = net.logits["resolution"].detach().cpu().numpy().astype(float)
        sizes = job.cost.sizes()
        summary = {
            "resolutions": sizes,
            "resolution_scales": [round(r.scale, 4) for r in job.cost.resolutions],
            "resolution_logits": res_logits.tolist(),
            "resolution": sizes[argmax_last(res_logits)],  # the strategy rebinds it (a resumed run's)
        }
    summary.update(
        {
            "epochs": job.epochs,
            "supernet_seconds": round(t.seconds, 1),
            "searched_groups": net.gids,
            "skipped_groups": {str(k): v for k, v in net.skipped.items()},
            "options": {str(k): v for k, v in net.options.items()},
            "sites": len(net.sites),
            "loss": job.config.loss,
            "final_logits": {str(k): v.tolist() for k, v in logits.items()},
        }
    )
    return SupernetResult(logits, t.tau(job.epochs), res_logits, t.history, summary, t.step.model, scores)


# --------------------------------------------------------------------------------------- checkpoint
def _meta(job: SupernetJob) -> dict:
    meta = {"options": {str(k): v for k, v in job.options.items()}, "epochs": job.epochs}
    if job.cost.resolutions:
        meta["resolutions"] = job.cost.sizes()
    return meta


def _restore(t: _Training, resume: bool) -> int:
    """The epoch to start at: after the checkpoint's (its state loaded) when the run resumes and the
    checkpoint was made with these options, epochs and resolutions; else 0 (the history starts with epoch
    0)."""
    job, s = t.job, t.step
    ckpt = load_checkpoint(t.checkpoint) if t.checkpoint is not None and resume else None
    if ckpt is not None:
        meta = json.loads(ckpt.get("meta", "{}"))
        mine = _meta(job)
        if (
            meta.get("options") != mine["options"]
            or meta.get("epochs") != mine["epochs"]
            or (meta.get("resolutions") != mine.get("resolutions"))
        ):
            log.warning("%s was made with other options or epochs; starting the supernet over", t.checkpoint)
            ckpt = None
    if ckpt is None:
        t.history = [snapshot(job, s.net, 0, job.config.tau0, None)]
        return 0
    s.model.load_state_dict(ckpt["model"])
    s.net.load_state_dict(ckpt["logits"], strict=False)
    s.wopt.load_state_dict(ckpt["wopt"])
    s.aopt.load_state_dict(ckpt["aopt"])
    start, t.steps_done = int(ckpt["epoch"]), int(ckpt["step"])
    t.history = json.loads(ckpt["history"])
    t.seconds = float(ckpt.get("seconds", 0.0))
    t.emit(f"supernet restored after epoch {start}/{job.epochs}")
    return start


def _save(t: _Training, epochs_done: int) -> None:
    if t.checkpoint is None or (t.rank is not None and not t.rank.main):
        return
    s = t.step
    atomic_save(
        {
            "epoch": epochs_done, "step": t.steps_done, "seconds": t.seconds,
            "meta": json.dumps(_meta(t.job)),
            "model": s.model.state_dict(), "logits": s.net.state_dict(),
            "wopt": s.wopt.state_dict(), "aopt": s.aopt.state_dict(),
            "history": json.dumps(t.history),
        },
        t.checkpoint,
    )  # fmt: skip
