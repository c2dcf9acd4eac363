"""Training on `--nproc-per-trial` processes (`train.ddp`): what travels to them and the fine-tune they run.

A user's model class lives in a file loaded by path (`load.py`), so pickling the module itself fails in another
process (spawn); what travels is how to build it (`PortableModule`): the model spec and input shape
(`load_model`), the slices that cut a candidate from it (`surgery.torch.slice_torch`; None: full width) and its
weights. `fit_on_ranks` is `train.loop.fit` on N processes: the same fine-tune as one process at the same global
batch (train/ddp.py says how), returning the weights of rank 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from onnxconet.errors import OnnxconetError
from onnxconet.train import ddp
from onnxconet.train.loop import TrainConfig, fit, resolve_device


@dataclass(frozen=True)
class PortableModule:
    spec: str
    input_shape: tuple[int, ...]
    state: dict
    slices: object | None = None

    @classmethod
    def of(cls, module: nn.Module, loaded, slices=None) -> PortableModule:
        """`module` (full width, or cut from the model by `slices`), rebuilt from `loaded` (a `LoadedModel`)."""
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        return cls(loaded.spec, tuple(loaded.input_shape), state, slices)

    def build(self) -> nn.Module:
        from onnxconet.load import load_model
        from onnxconet.surgery.torch import slice_torch

        module = load_model(self.spec, input_shape=self.input_shape).module.cpu().eval()
        if self.slices is not None:
            module = slice_torch(module, self.slices)
        module.load_state_dict(self.state)
        return module


@dataclass
class Ranks:
    """How a run trains on several processes: how many, the threads of each, the model they rebuild from."""

    nproc: int
    loaded: object  # the run's LoadedModel (spec, input shape)
    threads: int = 0
    _teacher: PortableModule | None = None

    def teacher(self, module: nn.Module | None) -> PortableModule | None:
        """The teacher as it travels (made once: its weights never change)."""
        if module is not None and self._teacher is None:
            self._teacher = PortableModule.of(module, self.loaded)
        return self._teacher if module is not None else None

    def fit(self, model: nn.Module, slices, loader, cfg: TrainConfig, teacher: nn.Module | None, device,
            every_epoch: bool = False) -> list[dict]:  # fmt: skip
        """`train.loop.fit(model, loader, cfg, teacher=teacher)` on `nproc` processes, `model` (cut by `slices`)
        updated in place. Returns its weights after each epoch when `every_epoch`, else []."""
        job = RankFit(
            PortableModule.of(model, self.loaded, slices), self.teacher(teacher), loader, cfg, every_epoch
        )
        state, states = fit_on_ranks(job, self.nproc, str(resolve_device(device)), self.threads)
        model.load_state_dict(state)
        return states


@dataclass(frozen=True)
class RankFit:
    """One fine-tune for `fit_on_ranks`: the student and teacher as `PortableModule`s, the loader (a map-style
    DataLoader, its generator seeded: every rank draws the same global batches), the config, and whether rank
    0 returns the weights after every epoch (for the per-epoch layer metric)."""

    model: PortableModule
    teacher: PortableModule | None
    loader: object
    cfg: TrainConfig
    every_epoch: bool = False


def fit_on_ranks(job: RankFit, nproc: int, device: str, threads: int = 0) -> tuple[dict, list[dict]]:
    """`fit` on `nproc` processes. Returns (the trained weights, [weights after each epoch] or [])."""
    if type(job.loader).__name__ != "DataLoader" or getattr(job.loader, "batch_sampler", None) is None:
        raise OnnxconetError(
            f"--nproc-per-trial shards a torch DataLoader's batches; this run trains from a "
            f"{type(job.loader).__name__} (searched resolutions?): drop --nproc-per-trial"
        )
    return ddp.launch(_fit_rank, nproc, job, device=device, threads=threads)


def _fit_rank(r: ddp.Rank, job: RankFit):
    model = ddp.sync_batchnorm(job.model.build().to(r.device), r)
    teacher = job.teacher.build() if job.teacher is not None else None
    states: list[dict] = []

    def keep(_epoch: int, wrapped: nn.Module) -> None:
        states.append(copy.deepcopy({k: v.cpu() for k, v in wrapped.module.state_dict().items()}))

    every = keep if job.every_epoch and r.main else None
    fit(ddp.wrap(model, r), ddp.shard_loader(job.loader, r), job.cfg, teacher=teacher, device=r.device,
        epoch_callback=every)  # fmt: skip
    model = ddp.unsync_batchnorm(model).cpu()
    return ({k: v.detach() for k, v in model.state_dict().items()}, states) if r.main else None
