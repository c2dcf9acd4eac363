"""ResNets for 32x32 inputs (CIFAR): ResNet-20 (He et al. 2016) and CONetV2's ResNet-34.

Usable as the model specs ``models/resnet_cifar.py:resnet20`` and ``models/resnet_cifar.py:resnet34``.
Plain torch only, so the file imports on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; 1x1 conv-BN projection when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem (no max-pool), BasicBlock stages, global average pool, linear head.

    Args:
        blocks: number of blocks per stage.
        widths: channels per stage; every stage after the first halves the resolution.
        num_classes: output size of the linear head.
        in_channels: image channels.
    """

    def __init__(
        self, blocks: list[int], widths: list[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        # Named layer1..layerN like torchvision, so state_dict keys read familiarly.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (N, w0, H, W)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = F.adaptive_avg_pool2d(x, 1)  # (N, C, 1, 1)
        return self.fc(torch.flatten(x, 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20: stages of 3 BasicBlocks with 16/32/64 channels (~0.27 M parameters)."""
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels)


def resnet34(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """CONetV2's ResNet-34 for CIFAR: BasicBlocks [3, 4, 6, 3], 64/128/256/512 channels (~21.3 M params)."""
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels)
