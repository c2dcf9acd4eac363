"""dmasking's knobs (`DMaskingConfig`): apart from the strategy so the run's config can validate them
(`SearchConfig.check`) without reading anything else of the method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from onnxconet.errors import OnnxconetError


@dataclass
class DMaskingConfig:
    """Knobs of the strategy (`SearchConfig.dmasking` overrides them by name).

    Attributes:
        epochs: supernet epochs; None: the training the driver would spend on its trials
            (trials x epochs_per_trial), at least `min_epochs`.
        min_epochs: lower bound of the default above.
        options: at most this many width options per group (spread over the group's grid).
        align: None (default): the run's widths, which `--align` already steps (`WidthSpace`); a number
            restricts options and derived widths further to multiples of it where a group has >= 4 of them
            (before 2026-12-06 this was 8 whatever --align said).
        tau0, tau_decay: Gumbel-softmax temperature at epoch e is tau0 * tau_decay**e.
        warmup: share of the epochs with the logits frozen.
        arch_lr, arch_wd: Adam for the logits.
        arch_split: share of the training data held out for the logits steps.
        loss: "hinge" or "fbnet" (see the package docstring); penalty, fbnet_a, fbnet_b their weights.
        margin: latency budgets are aimed at margin x budget (measurement noise).
        probes: measurements of the latency predictor (budget on latency).
        inherit: "supernet" (derived candidates start from the supernet's weights) or "original".
        sample_tau: temperature of the distributions sampled for trials >= 2 (None: the final τ).
        hard: which steps see hard (one-hot) Gumbel samples: "weights" (default: the weights step trains the
            sub-network of one sampled width per group; the logits step uses the soft masks, as FBNetV2),
            "both" (the logits step too, straight-through) or "none" (soft masks everywhere, as FBNetV2).
        verify: latency budgets: measure each derived candidate before handing it out and, while it measures
            over margin x budget, correct the prediction by measured / predicted and put it back on the budget
            (at most this many corrections; 0: trust the predictor).
        checkpoint: save the supernet state after every epoch (resume).
    """

    epochs: int | None = None
    min_epochs: int = 8
    options: int = 8
    align: int | None = None
    tau0: float = 5.0
    tau_decay: float = 0.956
    warmup: float = 0.1
    arch_lr: float = 0.01
    arch_wd: float = 5e-4
    arch_split: float = 0.2
    loss: str = "hinge"
    penalty: float = 5.0
    fbnet_a: float = 0.2
    fbnet_b: float = 0.6
    margin: float = 0.95
    probes: int = 12
    inherit: str = "supernet"
    sample_tau: float | None = None
    hard: str = "weights"
    verify: int = 2
    checkpoint: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DMaskingConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise OnnxconetError(f"unknown dmasking option(s) {bad}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        problems = []
        if self.loss not in ("hinge", "fbnet"):
            problems.append(f"loss {self.loss!r} is not hinge or fbnet")
        if self.hard not in ("none", "weights", "both"):
            problems.append(f"hard {self.hard!r} is not none, weights or both")
        if self.inherit not in ("supernet", "original"):
            problems.append(f"inherit {self.inherit!r} is not supernet or original")
        if self.align is not None and self.align < 1:
            problems.append(f"align must be >= 1 (or unset: the run's --align), got {self.align}")
        if self.options < 2:
            problems.append(f"options must be >= 2, got {self.options}")
        if not 0 < self.arch_split < 1:
            problems.append(f"arch_split must be in (0, 1), got {self.arch_split}")
        if self.tau0 <= 0 or not 0 < self.tau_decay <= 1:
            problems.append(f"tau0 > 0 and tau_decay in (0, 1] needed, got {self.tau0}, {self.tau_decay}")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not 0 < self.margin <= 1:
            problems.append(f"margin must be in (0, 1], got {self.margin}")
        if problems:
            raise OnnxconetError("invalid dmasking config: " + "; ".join(problems))
