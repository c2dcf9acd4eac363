"""Knowledge distillation from the original model: soft-target KL mixed with the label loss.

A pruned candidate starts close to the original network (it keeps the most important channels),
so a short fine-tune with the original as teacher recovers most of the lost accuracy faster than
labels alone (Hinton et al., 2015). The loss is

    (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

where the KL is averaged over the batch ("batchmean") and the T^2 factor keeps the gradient scale
of the soft term independent of the temperature.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from onnxconet.errors import OnnxconetError

__all__ = ["distillation_loss", "primary_logits"]


def primary_logits(output: Any) -> torch.Tensor:
    """Return the main logits from whatever a classification model's forward returned.

    Some models return more than one tensor in train mode: torchvision's GoogLeNet and
    Inception v3 return namedtuples ``(logits, aux_logits...)``, Hugging Face models return an
    object with ``.logits``. The loss uses the main logits only; auxiliary heads get no loss
    (they are dropped at export anyway, so their quality does not matter for deployment).

    Args:
        output: A tensor, an object with a ``logits`` attribute, a mapping with a ``"logits"``
            key, or a non-empty tuple/list whose first element is the main output.

    Returns:
        The logits tensor, shape (N, num_classes).

    Raises:
        OnnxconetError: If no logits tensor can be found in ``output``.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):  # namedtuples of torchvision, HF ModelOutput
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise OnnxconetError(
        f"cannot find logits in the model output of type {type(output).__name__}: the model must "
        "return a logits tensor, a tuple whose first element is the logits, or an object with "
        "a .logits attribute; wrap the model so its forward returns the logits tensor"
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Mix of the label cross-entropy and the softened teacher–student KL divergence.

    Args:
        student_logits: Student logits, shape (N, C); gradients flow through them.
        teacher_logits: Teacher logits, shape (N, C), or None for pure cross-entropy. They are
            detached: the teacher is never trained.
        targets: Class indices, shape (N,).
        alpha: Weight of the distillation term in [0, 1]; 0 gives pure cross-entropy.
        temperature: Softening temperature T > 0 applied to both logits in the KL term.

    Returns:
        The scalar loss (float32 when the logits are float32).

    Raises:
        OnnxconetError: If ``alpha`` or ``temperature`` is out of range or the two logits
            tensors have different shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise OnnxconetError(f"distillation alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise OnnxconetError(f"distillation temperature must be > 0, got {temperature}")
    ce = F.cross_entropy(student_logits, targets)
    if teacher_logits is None or alpha == 0.0:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise OnnxconetError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in shape: the candidate must keep the "
            "original model's classifier output (do not prune the last layer)"
        )
    t = float(temperature)
    log_q = F.log_softmax(student_logits / t, dim=-1)  # student, (N, C)
    log_p = F.log_softmax(teacher_logits.detach() / t, dim=-1)  # teacher, (N, C)
    # KL(p || q) = sum p (log p - log q); kl_div takes the *student* log-probs first.
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    if alpha == 1.0:
        return kl * (t * t)
    return (1.0 - alpha) * ce + alpha * (t * t) * kl
