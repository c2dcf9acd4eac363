"""The reference architectures in models/: they build, run, and export to ONNX faithfully."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

# (file, factory, num_classes)
FACTORIES = [
    ("digits_cnn.py", "digits_cnn", 10),
    ("resnet_cifar.py", "resnet20", 10),
    ("resnet_cifar.py", "resnet34", 100),
    ("mobilenetv2_cifar.py", "mobilenetv2", 10),
    ("fashion_mnist.py", "resnet20", 10),
    ("fashion_mnist.py", "mobilenetv2", 10),
]
EXPORTED = [
    f for f in FACTORIES if f[1] != "resnet34" and f[0] != "fashion_mnist.py"
]  # resnet34 export is too slow for the fast suite


def load_file(name: str) -> ModuleType:
    """Import a models/ file the way a "models/FILE.py:factory" spec does: by path, standalone."""
    spec = importlib.util.spec_from_file_location(f"_models_{Path(name).stem}", MODELS_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str, factory: str) -> tuple[torch.nn.Module, tuple[int, int, int, int]]:
    module = load_file(name)
    torch.manual_seed(0)
    return getattr(module, factory)().eval(), tuple(module.INPUT_SHAPE)


@pytest.mark.parametrize(("name", "factory", "num_classes"), FACTORIES, ids=[f[1] for f in FACTORIES])
def test_factory_builds_and_runs(name: str, factory: str, num_classes: int) -> None:
    model, shape = build(name, factory)
    assert len(shape) == 4 and shape[0] == 1
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (1, num_classes)
    assert torch.isfinite(out).all()


def test_models_import_nothing_from_onnxconet() -> None:
    for path in MODELS_DIR.glob("*.py"):
        assert "onnxconet" not in path.read_text(), f"{path.name} must stay standalone"


def test_resnet34_has_conetv2_size() -> None:
    model, _ = build("resnet_cifar.py", "resnet34")
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 21.3e6) / 21.3e6 < 0.02, params


def test_resnet20_size_and_custom_heads() -> None:
    module = load_file("resnet_cifar.py")
    model = module.resnet20()
    assert abs(sum(p.numel() for p in model.parameters()) - 0.27e6) / 0.27e6 < 0.02
    gray = module.resnet20(num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_mobilenetv2_width_mult_and_residuals() -> None:
    module = load_file("mobilenetv2_cifar.py")
    full, half = module.mobilenetv2(), module.mobilenetv2(width_mult=0.5)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters())
    blocks = [m for m in full.modules() if isinstance(m, module.InvertedResidual)]
    assert len(blocks) == 17 and sum(b.use_residual for b in blocks) == 10
    depthwise = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise) and len(depthwise) == 17


def test_digits_cnn_has_residual_adds() -> None:
    module = load_file("digits_cnn.py")
    model = module.digits_cnn()
    assert sum(isinstance(m, module.ResidualBlock) for m in model.modules()) >= 1
    assert max(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) >= 64


@pytest.mark.parametrize(("name", "factory", "num_classes"), EXPORTED, ids=[f[1] for f in EXPORTED])
def test_onnx_export_matches_torch(name: str, factory: str, num_classes: int) -> None:
    model, shape = build(name, factory)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    proto = program.model_proto
    ops = {n.op_type for n in proto.graph.node}
    assert "Conv" in ops and "BatchNormalization" in ops  # optimize=False keeps BN separate
    assert "Add" in ops  # residual connections
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (1, num_classes)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
