"""Correctness oracle on real architectures at small input sizes (see tests/oracle.py)."""

from pathlib import Path

import pytest
import torch
import torchvision

from onnxconet.load import load_model
from tests.oracle import check_model

TORCHVISION = [
    ("resnet18", 64),
    ("mobilenet_v3_small", 64),
    ("efficientnet_b0", 64),
    ("densenet121", 64),
    ("shufflenet_v2_x0_5", 64),
    ("regnet_y_400mf", 64),
    ("googlenet", 64),
]
MODELS = Path(__file__).resolve().parent.parent / "models"
LOCAL = [
    ("digits_cnn.py:digits_cnn", None),
    ("resnet_cifar.py:resnet20", None),
    ("resnet_cifar.py:resnet34", None),
    ("mobilenetv2_cifar.py:mobilenetv2", None),
]


@pytest.mark.parametrize(("name", "res"), TORCHVISION)
def test_torchvision_oracle(name, res):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kw)
    out = check_model(model, (1, 3, res, res))
    assert out["changed"] > 1e-3  # pruning changed the function: the comparison above was not vacuous
    assert len(out["cg"].prunable) >= 10


@pytest.mark.parametrize(("spec", "_"), LOCAL)
def test_reference_models_oracle(spec, _):
    loaded = load_model(str(MODELS / spec))
    out = check_model(loaded.module, loaded.input_shape)
    assert out["changed"] > 1e-4
