"""The search space: for every prunable group, the widths it may take; and width configurations (`Widths`)
with their JSON file format.

Widths file (written by the search and by `onnxconet inspect --widths-out`, read by `profile --widths`):

    {"format": "onnxconet-widths/1", "model": "torchvision:resnet18", "fingerprint": "63b39243b3e7ea8f",
     "widths": {"1": 64, "2": 32, ...}}

`fingerprint` identifies the group structure (ChannelGraph.fingerprint): a file made for another model, input
shape or export is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxconet.errors import OnnxconetError, SurgeryError
from onnxconet.files import atomic_write
from onnxconet.graph.groups import ChannelGraph

FORMAT = "onnxconet-widths/1"


@dataclass(frozen=True)
class GroupSpace:
    """Allowed widths of one group: multiples of `step` in [lo, hi], and 0 when `zero` (the group's residual
    branch removed: `graph.branches`)."""

    id: int
    lo: int
    hi: int
    step: int
    zero: bool = False

    def clip(self, w: float) -> int:
        """Nearest allowed width."""
        if self.zero and w < self.lo / 2:
            return 0
        w = int(round(w / self.step)) * self.step
        return int(min(self.hi, max(self.lo, w)))

    def options(self) -> list[int]:
        return [0] * self.zero + list(range(self.lo, self.hi + 1, self.step))

    def up(self, w: int) -> int:
        """The next allowed width above `w` (`hi` stays)."""
        return self.lo if w < self.lo else min(self.hi, w + self.step)


class WidthSpace:
    """Per prunable group: min, max, step (a multiple of the group's divisor; `align` for hardware-friendly
    widths). `min_ratio` bounds how far a group may shrink.

    Alignment: a group whose width is a multiple of ``align·divisor`` moves in steps of it, however narrow
    (a 16-channel group at align 8 may be 8 or 16, never 6): on CPU, onnxruntime runs a convolution in the
    blocked NCHWc layout only when its channel counts are multiples of the block (8 on AVX2), and one
    unaligned narrow group pushes its consumers onto the plain path plus layout reorders (mobilenet_v2 at
    224, 1 thread: a 16-channel group at 13 instead of 16 made its 112×112 consumer and the reorder cost
    1.3 ms, 11 % of the whole model). Groups wide enough (≥ 4·align·divisor) but not a multiple of it are
    aligned too; only groups narrower than that and not a multiple move in steps of their divisor.
    """

    def __init__(
        self, cg: ChannelGraph, min_ratio: float = 0.125, align: int = 1, depth: bool = False
    ) -> None:
        """`depth`: groups whose residual branch can be removed (`ChannelGraph.removable`) may also take 0."""
        if not 0 < min_ratio <= 1:
            raise OnnxconetError(f"min_ratio {min_ratio} must be in (0, 1]")
        self.fingerprint = cg.fingerprint()
        self.groups: dict[int, GroupSpace] = {}
        for g in cg.prunable:
            unit = g.divisor * align
            step = unit if g.channels % unit == 0 or g.channels >= 4 * unit else g.divisor
            lo = max(step, int(np.ceil(min_ratio * g.channels / step)) * step)
            hi = g.channels
            zero = depth and g.id in cg.removable
            if lo < hi or zero:
                self.groups[g.id] = GroupSpace(
                    g.id, lo, hi, step if (hi - lo) % step == 0 else g.divisor, zero
                )

    def __iter__(self) -> Iterator[GroupSpace]:
        return iter(self.groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def full(self) -> dict[int, int]:
        return {g.id: g.hi for g in self}

    def smallest(self) -> dict[int, int]:
        """Every group at its narrowest: 0 where its branch may go."""
        return {g.id: 0 if g.zero else g.lo for g in self}

    def uniform(self, scale: float) -> dict[int, int]:
        """Every group at `scale` of its full width (nearest allowed; never 0: uniform width keeps the depth)."""
        return {g.id: g.clip(max(scale * g.hi, g.lo)) for g in self}

    def clip(self, widths: Mapping[int, float]) -> dict[int, int]:
        return {g.id: g.clip(widths.get(g.id, g.hi)) for g in self}

    def contains(self, widths: Mapping[int, int]) -> bool:
        for g in self:
            w = widths.get(g.id, g.hi)
            if not (g.lo <= w <= g.hi and (w - g.lo) % g.step == 0) and not (g.zero and w == 0):
                return False
        return True

    def sample(self, rng: np.random.Generator) -> dict[int, int]:
        return {g.id: int(rng.choice(g.options())) for g in self}


def save_widths(path: str | Path, widths: Mapping[int, int], cg: ChannelGraph, model: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT,
        "model": model,
        "fingerprint": cg.fingerprint(),
        "widths": {str(k): int(v) for k, v in sorted(widths.items())},
    }
    atomic_write(p, json.dumps(data, indent=1) + "\n")


def load_widths(path: str | Path, cg: ChannelGraph) -> dict[int, int]:
    """Read a widths file and check it against `cg` (fingerprint, group ids, widths in range)."""
    p = Path(path)
    if not p.is_file():
        raise OnnxconetError(f"--widths {path}: file not found")
    try:
        data = json.loads(p.read_text())
        widths = {int(k): int(v) for k, v in data["widths"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise OnnxconetError(
            f'--widths {path}: not a widths file (expected {{"widths": {{group: channels}}}}); '
            "make one with onnxconet inspect MODEL --widths-out FILE"
        ) from None
    fp = data.get("fingerprint")
    if fp and fp != cg.fingerprint():
        raise OnnxconetError(
            f"--widths {path} was made for another model or input shape (fingerprint {fp}, this "
            f"model {cg.fingerprint()}); regenerate it with onnxconet inspect --widths-out"
        )
    for gid in widths:
        if gid >= len(cg.groups):
            raise SurgeryError(
                f"--widths {path}: group {gid} does not exist (groups 0..{len(cg.groups) - 1})"
            )
    return widths
