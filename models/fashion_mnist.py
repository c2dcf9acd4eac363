"""The CIFAR networks of this folder for 1-channel 28x28 images (Fashion-MNIST, MNIST): no padding to 32.

(the CLI) search models/fashion_mnist.py:resnet20 --data fashion-mnist
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

INPUT_SHAPE = (1, 1, 28, 28)
_HERE = Path(__file__).resolve().parent


def _sibling(stem: str):
    """Import models/<stem>.py by path (this folder is not a package)."""
    name = f"_fashion_mnist_base_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 (16/32/64 channels) on 1-channel input; stages at 28, 14 and 7 pixels."""
    return _sibling("resnet_cifar").resnet20(num_classes, in_channels=1)


def mobilenetv2(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 for CIFAR on 1-channel input."""
    return _sibling("mobilenetv2_cifar").mobilenetv2(num_classes, in_channels=1)
