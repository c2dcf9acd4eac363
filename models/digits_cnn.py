"""The built-in default model: a small residual CNN for scikit-learn's digits upsampled to 32x32.

Usable as the model spec ``models/digits_cnn.py:digits_cnn``. Sized so that onnxruntime on two
CPU threads is compute-bound (~85 M MACs, about 1.2 ms per image) while a training epoch over
the ~1250 training digits takes a few seconds: only the cheap stem runs at 32x32, the rest at
16x16 and 8x8. Each stage has residual blocks, so the export has Add nodes that merge channel
groups. Plain torch only, so the file imports on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 1, 32, 32)


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias), BatchNorm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class DigitsCNN(nn.Module):
    """Stem at full resolution; per stage a stride-2 conv-BN-ReLU and residual blocks; GAP; linear.

    Args:
        num_classes: output size of the linear head.
        in_channels: image channels.
        stem: channels of the stem conv (full resolution).
        widths: channels of the stages; each stage halves the resolution.
        blocks: residual blocks per stage.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem: int = 32,
        widths: tuple[int, ...] = (64, 128),
        blocks: int = 2,
    ) -> None:
        super().__init__()
        self.stem = ConvBNReLU(in_channels, stem)
        stages = []
        prev = stem
        for w in widths:
            stages.append(
                nn.Sequential(ConvBNReLU(prev, w, stride=2), *[ResidualBlock(w) for _ in range(blocks)])
            )
            prev = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, 32, 32, 32)
        x = self.stages(x)  # (N, 128, 8, 8)
        x = F.adaptive_avg_pool2d(x, 1)  # (N, 128, 1, 1)
        return self.fc(torch.flatten(x, 1))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """The default model: stem 32 ch at 32x32, stages of 64 ch (16x16) and 128 ch (8x8) with two
    residual blocks each; 11 convs, ~0.85 M parameters, ~85 M MACs per image."""
    return DigitsCNN(num_classes)
