"""Tiny models for CLI tests (usable as tests/data/tiny_models.py:FACTORY)."""

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class TinyRes(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.conv2(self.conv1(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_res() -> nn.Module:
    return TinyRes()


def raises() -> nn.Module:
    raise ValueError("this factory always fails")


def not_a_module():
    return 42


class HardCoded(nn.Module):
    """forward() spells a channel count out (view(N, 8, -1)): the graph allows pruning that group, torch
    does not; the surgery check must catch it and freeze the group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x).view(x.size(0), 6, -1).mean(-1)
        return self.head(x)


def hardcoded() -> nn.Module:
    return HardCoded()


class Mix(nn.Module):
    """Concat of a plain and a grouped branch, a depthwise conv, a flatten with spatial extent into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.dw = nn.Sequential(nn.Conv2d(10, 10, 3, padding=1, groups=10), nn.BatchNorm2d(10), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(10 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(torch.flatten(self.pool(self.dw(x)), 1))


def mix() -> nn.Module:
    return Mix()
