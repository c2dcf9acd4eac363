"""Short fine-tuning of candidates: the training loop, evaluation and BatchNorm recalibration.

Reading order is execution order: ``TrainConfig`` -> ``resolve_device`` -> ``evaluate`` ->
``fit`` (uses ``evaluate`` for validation) -> ``recalibrate_bn`` (run before ``fit`` on a
freshly sliced candidate, whose inherited BN statistics no longer match its channels).

Loaders yield ``(inputs, labels)`` batches; labels are class indices. Every function moves the
model (and the teacher) to the resolved device in place.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from onnxconet import faults
from onnxconet.errors import DataError, OnnxconetError
from onnxconet.train.distill import distillation_loss, primary_logits

__all__ = ["TrainConfig", "evaluate", "fit", "lr_at", "make_optimizer", "recalibrate_bn", "resolve_device"]

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]

# On CUDA, reading the loss back every batch stalls the launch queue; read it every few batches.
_CUDA_SYNC_EVERY = 25


@dataclass
class TrainConfig:
    """Hyper-parameters of a short fine-tune.

    Attributes:
        epochs: Passes over the training loader (0: ``fit`` does nothing).
        lr: Peak learning rate, used as-is for both optimizers (use ~1e-3 with "adamw").
        momentum: SGD momentum; beta1 of AdamW.
        weight_decay: Applied to every trainable parameter.
        optimizer: "sgd" or "adamw".
        schedule: "cosine" (per-step decay from ``lr`` to 0 over the run) or "constant".
        batch_size: Not used by ``fit`` (it receives loaders); read by whoever builds them.
        alpha: Weight of the distillation term (see ``distillation_loss``); ignored without teacher.
        temperature: Distillation temperature.
        amp: Mixed precision, only effective on CUDA: bf16 autocast where supported, else fp16
            autocast with a GradScaler.
        max_batches: Cap on batches per epoch, for training and validation (smoke runs).
        seed: Seed of torch's RNG inside ``fit`` (dropout, unseeded loader shuffling).
    """

    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = 128
    alpha: float = 0.5
    temperature: float = 4.0
    amp: bool = True
    max_batches: int | None = None
    seed: int = 0
    # on the CPU, train in the channels-last layout (oneDNN's faster convolutions: a Fashion-MNIST ResNet-20 epoch
    # 8-26 % shorter, the digits CNN's 1-17 %; docs/measurements.md); the model comes back in the default layout
    channels_last: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer {self.optimizer!r} is not 'sgd'/'adamw'"),
            (
                self.schedule in ("cosine", "constant"),
                f"schedule {self.schedule!r} is not 'cosine'/'constant'",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (
                self.max_batches is None or self.max_batches >= 1,
                f"max_batches must be >= 1, got {self.max_batches}",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise OnnxconetError("invalid training config: " + "; ".join(problems))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn a device name into a ``torch.device``.

    Args:
        device: "auto" or None (CUDA if available, else CPU), or any torch device string
            ("cpu", "cuda", "cuda:1", ...).

    Returns:
        The device.

    Raises:
        OnnxconetError: If the name is invalid or names CUDA on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OnnxconetError(f"invalid device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OnnxconetError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def _unpack(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Split a batch into (inputs, labels) on ``device`` plus the largest label (None if unknown)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError(f"the data loader must yield (inputs, labels) batches, got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError("the data loader must yield tensors (inputs, labels)")
    if y.is_floating_point() or y.is_complex() or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"labels must be class indices of shape ({x.shape[0]},), got {y.dtype} "
            f"{tuple(y.shape)} (soft / one-hot labels are not supported)"
        )
    y_max = None
    if y.device.type == "cpu" and y.numel():  # checked here, where it costs no device sync
        if int(y.min()) < 0:
            raise DataError(f"labels must be >= 0, got {int(y.min())}")
        y_max = int(y.max())
    return x.to(device, non_blocking=True), y.to(device, dtype=torch.long, non_blocking=True), y_max


def _check_classes(logits: torch.Tensor, y_max: int | None) -> None:
    if y_max is not None and y_max >= logits.shape[-1]:
        raise DataError(
            f"label {y_max} is out of range for a model with {logits.shape[-1]} outputs: "
            "the dataset has more classes than the model's classifier"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``loader`` (fp32, eval mode).

    Args:
        model: Classifier; moved to ``device`` and left in eval mode.
        loader: Yields (inputs, labels) batches.
        device: See ``resolve_device``.
        max_batches: Evaluate at most this many batches.

    Returns:
        ``{"accuracy": top-1 in [0, 1], "loss": mean CE per sample, "samples": n}``.

    Raises:
        DataError: If the loader yields no batch or malformed batches.
    """
    dev = resolve_device(device)
    model.to(dev).eval()
    # Accumulate on the device; one sync at the end.
    correct = torch.zeros((), dtype=torch.long, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n = 0
    for batch in islice(loader, max_batches):
        x, y, y_max = _unpack(batch, dev)
        logits = primary_logits(model(x)).float()  # (N, C)
        _check_classes(logits, y_max)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(dim=-1) == y).sum()
        n += y.shape[0]
    if n == 0:
        raise DataError("the evaluation loader yielded no samples")
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n, "samples": n}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over ``model``'s trainable parameters (public: dmasking's supernet trains its
    weights with the same optimizer and schedule as a fine-tune)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise OnnxconetError("the model has no trainable parameters (all have requires_grad=False)")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1) of the run."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _steps_per_epoch(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:  # iterable-style loader without a length
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _train_layout(
    model: nn.Module, dev: torch.device, cfg: TrainConfig, teacher: nn.Module | None = None
) -> torch.memory_format | None:
    """The memory format ``fit`` trains ``model`` (and ``teacher``) in: channels-last on the CPU for models with 4-D
    weights, else None (the layout they have). Not under DistributedDataParallel, whose gradient buckets were laid
    out with the parameters before ``fit`` sees them."""
    if not cfg.channels_last or dev.type != "cpu":
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    dims = {t.dim() for m in (model, teacher) if m is not None for t in (*m.parameters(), *m.buffers())}
    # Module.to converts 5-D tensors too, and channels_last is only for 4-D ones
    return torch.channels_last if 4 in dims and 5 not in dims else None


def _default_layout(layout: torch.memory_format | None, *models: nn.Module | None) -> None:
    """The models `fit` trained in `layout` back in the default one, which surgery, export and state_dicts see."""
    for m in models:
        if layout is not None and m is not None:
            m.to(memory_format=torch.contiguous_format)


@dataclass
class _Run:
    """What one ``fit`` call shares between its epochs."""

    model: nn.Module
    teacher: nn.Module | None
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None
    steps: int | None  # batches per epoch, None if the loader has no length
    progress: Progress | None
    layout: torch.memory_format | None = None  # of the inputs, as the model's (`_train_layout`)
    step: int = 0

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.sync_every = _CUDA_SYNC_EVERY if self.device.type == "cuda" else 1

    def epoch(self, train_loader: Iterable, val_loader: Iterable | None, epoch: int, history: dict) -> dict:
        """Train one epoch, validate, log; appends to ``history`` and returns the epoch's progress record."""
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        record: dict[str, Any] = {"phase": "epoch", "epoch": epoch, "epochs": cfg.epochs}
        record["train_loss"] = self.train_epoch(train_loader, epoch)
        history["train_loss"].append(record["train_loss"])
        record["val_accuracy"] = None
        if val_loader is not None:
            val = evaluate(model, val_loader, self.device, max_batches=cfg.max_batches)
            history["val_accuracy"].append(val["accuracy"])
            history["val_loss"].append(val["loss"])
            record["val_accuracy"] = val["accuracy"]
        model.eval()
        record["seconds"] = time.perf_counter() - t0
        logger.info(
            "epoch %d/%d: train loss %.4f%s (%.1f s)", epoch + 1, cfg.epochs, record["train_loss"],
            "" if record["val_accuracy"] is None else f", val acc {record['val_accuracy']:.2%}",
            record["seconds"],
        )  # fmt: skip
        return record

    def train_epoch(self, loader: Iterable, epoch: int) -> float:
        """One pass over ``loader``; returns the mean training loss per sample."""
        cfg = self.cfg
        total = self.steps * cfg.epochs if self.steps else None
        self.model.train()
        self._sum, self._n, batches = 0.0, 0, 0
        pending: list[tuple[int, torch.Tensor, int]] = []  # (batch, loss * n, n) not yet read back
        for b, batch in enumerate(islice(loader, cfg.max_batches)):
            if b == (self.steps or 2) // 2:
                faults.point(f"epoch {epoch + 1} half")
            frac = self.step / total if total else epoch / cfg.epochs
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, frac)
            x, y, y_max = _unpack(batch, self.device)
            if self.layout is not None and x.dim() == 4:
                x = x.contiguous(memory_format=self.layout)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = primary_logits(self.model(x))
                t_logits = None
                if self.teacher is not None and cfg.alpha > 0:
                    with torch.no_grad():  # same inputs, no graph through the teacher
                        t_logits = primary_logits(self.teacher(x)).float()
            logits = logits.float()  # the loss in fp32, (N, C)
            _check_classes(logits, y_max)
            loss = distillation_loss(logits, t_logits, y, cfg.alpha, cfg.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.step += 1
            batches += 1
            pending.append((b, loss.detach() * y.shape[0], y.shape[0]))
            if len(pending) >= self.sync_every:
                self._read_back(pending, epoch, batches)
        self._read_back(pending, epoch, batches)
        if batches == 0:
            raise DataError("the training loader yielded no batches")
        return self._sum / self._n

    def _read_back(self, pending: list[tuple[int, torch.Tensor, int]], epoch: int, batches: int) -> None:
        """Read the pending losses back (one device sync), check them, report progress."""
        if not pending:
            return
        values = torch.stack([v for _, v, _ in pending]).tolist()
        for (b, _, n), v in zip(pending, values, strict=True):
            if not math.isfinite(v):
                raise self._nan_error(v / n, epoch, b)
            self._sum += v
            self._n += n
        pending.clear()
        if self.progress is not None:
            self.progress({
                "phase": "train", "epoch": epoch, "epochs": self.cfg.epochs, "batch": batches,
                "batches": self.steps, "loss": self._sum / self._n, "lr": self.optimizer.param_groups[0]["lr"],
            })  # fmt: skip

    def _nan_error(self, value: float, epoch: int, batch: int) -> OnnxconetError:
        cfg = self.cfg
        hint = f"lower the learning rate (lr={cfg.lr:g}, e.g. lr={cfg.lr / 10:g})"
        if self.amp_dtype is not None:
            hint += f" or disable mixed precision (amp=False; {self.amp_dtype} was used)"
        return OnnxconetError(
            f"training loss became {value} at epoch {epoch + 1}/{cfg.epochs}, batch {batch + 1} "
            f"(current lr {self.optimizer.param_groups[0]['lr']:.3g}): {hint}; "
            "also check the inputs for NaN/Inf values"
        )


def fit(
    model: nn.Module,
    train_loader: Iterable,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    val_loader: Iterable | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    epoch_callback: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """Train ``model`` in place, optionally distilling from ``teacher``.

    The loss is ``distillation_loss(student, teacher, labels, cfg.alpha, cfg.temperature)`` on the
    main logits (auxiliary outputs of e.g. GoogLeNet / Inception in train mode are ignored, see
    ``primary_logits``). The teacher runs in eval mode under ``no_grad`` on the same inputs, on the
    same device (it is moved there; its train/eval mode is restored at the end).

    Torch's global RNG is seeded with ``cfg.seed`` inside a forked RNG state, so runs are
    deterministic on CPU for a fixed seed and the caller's RNG stream is left untouched.
    Shuffling comes from the loader (its own generator if it has one, else the seeded RNG).

    Args:
        model: The student; moved to ``device``, trained in place, left in eval mode.
        train_loader: Yields (inputs, labels) batches.
        cfg: Hyper-parameters.
        teacher: Model to distill from, or None for plain cross-entropy.
        val_loader: If given, evaluated after every epoch (capped by ``cfg.max_batches``).
        device: See ``resolve_device``.
        progress: Called with dicts: ``{"phase": "train", "epoch", "epochs", "batch" (batches
            done in this epoch), "batches" (per epoch, None if unknown), "loss" (mean so far),
            "lr"}`` every batch on CPU / every few batches on CUDA, and ``{"phase": "epoch",
            "epoch", "epochs", "train_loss", "val_accuracy" (None without val_loader),
            "seconds"}`` after each epoch. Epochs are 0-based.
        epoch_callback: ``epoch_callback(epoch, model)`` after each epoch (0-based, after
            validation, model in eval mode).

    Returns:
        ``{"train_loss": [per epoch], "val_accuracy": [per epoch, empty without val_loader],
        "val_loss": [likewise], "seconds": total wall time}``.

    Raises:
        OnnxconetError: If the loss becomes NaN/Inf (names the epoch and batch) or the teacher
            is the model itself.
        DataError: If a loader yields no batch or malformed batches.
    """
    if teacher is model:
        raise OnnxconetError("the teacher must be a separate model (e.g. a copy of the original)")
    dev = resolve_device(device)
    layout = _train_layout(model, dev, cfg, teacher)
    model.to(dev, memory_format=layout or torch.preserve_format)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(dev, memory_format=layout or torch.preserve_format).eval()
    amp_dtype = _amp_dtype(dev, cfg.amp)
    history: dict[str, Any] = {"train_loss": [], "val_accuracy": [], "val_loss": []}
    start = time.perf_counter()
    _log_start(cfg, dev, teacher is not None, amp_dtype)
    try:
        with torch.random.fork_rng(devices=_rng_devices(dev)):
            torch.manual_seed(cfg.seed)
            run = _Run(
                model, teacher, cfg, make_optimizer(model, cfg), dev, amp_dtype,
                _steps_per_epoch(train_loader, cfg.max_batches), progress, layout,
            )  # fmt: skip
            for epoch in range(cfg.epochs):
                record = run.epoch(train_loader, val_loader, epoch, history)
                if progress is not None:
                    progress(record)
                if epoch_callback is not None:
                    epoch_callback(epoch, model)
                faults.point(f"epoch {epoch + 1} end")
    finally:
        if teacher is not None:
            teacher.train(teacher_was_training)
        _default_layout(layout, model, teacher)
    model.eval()
    history["seconds"] = time.perf_counter() - start
    return history


def _rng_devices(dev: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``fit`` forks (none on CPU)."""
    return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []


def _log_start(cfg: TrainConfig, dev: torch.device, distill: bool, amp_dtype: torch.dtype | None) -> None:
    logger.info(
        "fine-tuning %d epoch(s) on %s (%s, lr %g, %s schedule, %s, amp %s)",
        cfg.epochs, dev, cfg.optimizer, cfg.lr, cfg.schedule,
        f"distillation alpha={cfg.alpha} T={cfg.temperature}" if distill else "labels only",
        amp_dtype if amp_dtype is not None else "off",
    )  # fmt: skip


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    batches: int = 20,
    device: str | torch.device | None = None,
) -> None:
    """Re-estimate every BatchNorm's running statistics from data.

    A sliced candidate inherits BN statistics computed for the original network's channels and
    inputs; they no longer describe its activations. Statistics are reset and re-estimated as a
    cumulative average (``momentum=None``) over ``batches`` batches, then each BN's momentum is
    restored. Only the BN layers run in train mode (the rest in eval mode, so dropout, drop-path
    and auxiliary heads behave as at inference and the statistics match what eval sees).

    Args:
        model: Modified in place, moved to ``device`` and left in eval mode. No-op (apart from
            eval mode) if it has no BatchNorm with running statistics.
        loader: Yields (inputs, labels) batches; labels are ignored.
        batches: Number of batches to forward.
        device: See ``resolve_device``.

    Raises:
        DataError: If the loader yields no batch.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    dev = resolve_device(device)
    model.to(dev).eval()
    if not bns:
        logger.debug("recalibrate_bn: the model has no BatchNorm, nothing to do")
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the recalibration batches
        bn.train()
    n = 0
    try:
        for batch in islice(loader, batches):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise DataError(
                    f"the data loader must yield (inputs, labels) batches, got {type(batch).__name__}"
                )
            model(x.to(dev, non_blocking=True))
            n += 1
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.eval()
    if n == 0:
        raise DataError("the BatchNorm recalibration loader yielded no batches")
    logger.debug("recalibrated %d BatchNorm layer(s) on %d batch(es)", len(bns), n)
