"""Data parallelism inside one training run (`--nproc-per-trial N`): N processes on this machine, torch.distributed
(gloo on CPU, NCCL on CUDA), started by torchrun's own launcher (`torch.distributed.launcher.api.elastic_launch`,
rendezvous on loopback).

The N processes train the same network one process would at the same global batch, up to float summation order:
  * each rank takes every N-th sample of each *global* batch (`ShardedBatches` over the loader's own batch
    sampler: the global batches, their order and shuffling are exactly one process's);
  * gradients are averaged over ranks: DDP for the model's weights (`wrap`), `average_grads` for parameters
    outside the model (dmasking's logits);
  * BatchNorm normalizes with the statistics of the global batch: torch's SyncBatchNorm on CUDA; on CPU, where
    torch's refuses ("SyncBatchNorm layers only work with GPU modules"), `sync_batchnorm` gives each BatchNorm a
    forward whose per-channel sums go through torch.distributed.nn's differentiable all_reduce.

The global batch must be divisible by N (each rank's shard is then the same size, and the mean of the shards'
mean losses is the global batch's mean loss).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import types
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.modules.batchnorm import _BatchNorm

from onnxconet.errors import OnnxconetError


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel training: rank, world size, and its torch device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch(fn: Callable, nproc: int, *args, device: str = "cpu", threads: int | None = None):
    """Run `fn(Rank, *args)` in `nproc` processes joined in one process group; return rank 0's return value.

    `args` travel to the processes as one plain pickle (bytes: torch's shared-memory transport of tensors fails
    on a torch.Generator's state, which a loader's shuffling needs), so they must be picklable by a process that
    imports them by name (tensors, datasets, dataclasses of those; not a class defined in a user's file); so must
    rank 0's return value. `threads`: torch intra-op threads per process (default: this process's count / nproc,
    at least 1). Raises OnnxconetError naming the failed rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise OnnxconetError(f"--nproc-per-trial must be >= 1, got {nproc}")
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.device_count() < nproc:
        raise OnnxconetError(
            f"--nproc-per-trial {nproc} on CUDA needs {nproc} GPUs, this machine has {torch.cuda.device_count()}"
        )
    threads = threads or max(1, torch.get_num_threads() // nproc)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"onnxconet-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn",
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="onnxconet-ddp-") as errors:
        try:
            results = elastic_launch(config, _entry)(fn, dev.type, threads, pickle.dumps(args), errors)
        except ChildFailedError as e:
            rank, line = _root_failure(e, Path(errors))
            raise OnnxconetError(f"data-parallel training failed in rank {rank} of {nproc}: {line}") from None
    return pickle.loads(results[0])


# a rank whose peer died fails in its next collective: that is a consequence, not the cause
_KNOCK_ON = ("gloo", "NCCL", "Connection reset", "DistBackendError", "Connection closed by peer")


def _root_failure(e, errors: Path) -> tuple[int, str]:
    """(rank, its error in one line) of the failure that caused the others: the first error a rank wrote that is
    not a peer's broken connection (torchrun reports the first process it saw fail, often the knock-on)."""
    written = sorted(errors.glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)
    found = [(int(p.stem.split("-")[1]), p.read_text().strip()) for p in written]
    for rank, f in sorted(e.failures.items(), key=lambda kv: kv[1].timestamp):
        message = f.message.get("message", "") if isinstance(f.message, dict) else f.message
        lines = str(message).strip().splitlines()
        found.append((rank, lines[-1] if lines else f"exit code {f.exitcode}"))
    return next((x for x in found if not any(k in x[1] for k in _KNOCK_ON)), found[0])


@record  # the rank's exception (type and message) reaches `launch` through torchrun's error file
def _entry(fn: Callable, device_type: str, threads: int, args: bytes, errors: str) -> bytes:
    """One rank: join the group (torchrun's environment), run `fn`, leave."""
    torch.set_num_threads(threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return pickle.dumps(fn(Rank(rank, world, device), *pickle.loads(args)))
    except Exception as e:
        Path(errors, f"rank-{rank}.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0][:500])
        raise
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- data
class ShardedBatches:
    """A batch sampler giving rank `rank` of `world` every `world`-th index of each global batch of `batches`
    (a loader's batch sampler: the same global batches, in the same order, as one process sees)."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) % self.world:
                raise OnnxconetError(
                    f"a global batch of {len(batch)} samples cannot be split evenly over {self.world} "
                    f"processes: use a batch size divisible by --nproc-per-trial (and drop the last batch)"
                )
            yield list(batch)[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def shard_loader(loader: torch.utils.data.DataLoader, r: Rank) -> torch.utils.data.DataLoader:
    """`loader` for rank `r`: its own dataset, collate, batch sampler and generator (an iteration draws the
    workers' base seed from it before the sampler shuffles: the same draws as one process), each global batch
    sharded."""
    return torch.utils.data.DataLoader(
        loader.dataset, batch_sampler=ShardedBatches(loader.batch_sampler, r.rank, r.world),
        collate_fn=loader.collate_fn, num_workers=loader.num_workers, generator=loader.generator,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- gradients
def wrap(model: nn.Module, r: Rank) -> nn.Module:
    """`model` (already on r.device, BatchNorms synced) under DDP: its weights' gradients averaged over ranks."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [r.device.index] if r.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def average_grads(params: Iterable[nn.Parameter], r: Rank) -> None:
    """Average the gradients of `params` over ranks (parameters DDP does not hold: one flat all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if r.world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= r.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(values: list[float], r: Rank) -> list[float]:
    """The mean of each of `values` over the ranks (for reporting: losses of the global batch)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / r.world).tolist()


# ---------------------------------------------------------------------------------------------- BatchNorm
def sync_batchnorm(model: nn.Module, r: Rank) -> nn.Module:
    """BatchNorm over the global batch. CUDA: torch's SyncBatchNorm (returns the converted model, whose BN
    modules are new objects). CPU: the same modules (their hooks and names kept) with `_sync_forward`; undo
    with `unsync_batchnorm`."""
    if r.world == 1:
        return model
    if r.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.forward = types.MethodType(_sync_forward, m)
    return model


def unsync_batchnorm(model: nn.Module) -> nn.Module:
    """A plain model again (CPU: the BatchNorms' own forward; CUDA: SyncBatchNorm back to BatchNorm2d)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and "forward" in vars(m):
            del m.forward
    return _revert_sync(model)


def _revert_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.SyncBatchNorm):
        out = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)  # fmt: skip
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        out._forward_hooks = module._forward_hooks
    for name, child in module.named_children():
        out.add_module(name, _revert_sync(child))
    return out


def _sync_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the batch of every rank: per-channel sum, sum of squares and count all-reduced (with
    gradients, torch.distributed.nn), then normalized as `F.batch_norm` with those statistics; running
    statistics updated as torch's BatchNorm does (unbiased variance, momentum or cumulative average)."""
    if not self.training and self.track_running_stats:  # eval: the running statistics, as torch's
        return type(self).forward(self, x)
    from torch.distributed.nn.functional import all_reduce  # the all-reduce with a backward (a sum again)

    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
    with warnings.catch_warnings():  # torch 2.14 points to a private module (_functional_collectives) instead
        warnings.simplefilter("ignore", FutureWarning)
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
    if self.training and self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


__all__ = [
    "Rank", "ShardedBatches", "average_grads", "launch", "mean_over_ranks", "shard_loader", "sync_batchnorm", "unsync_batchnorm",
    "wrap",
]  # fmt: skip
