"""--pretrained: the library's own weights from the local cache, never a download, one line when absent."""

from __future__ import annotations

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from onnxconet import load
from onnxconet.cli import app
from onnxconet.errors import ModelSpecError
from onnxconet.load import PRETRAINED, load_model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch hub's folder in tmp, and any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub" / "checkpoints"


def test_cached_torchvision_weights_are_loaded(hub):
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    hub.mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, hub / url.rsplit("/", 1)[1])
    module = load_model("torchvision:resnet18", PRETRAINED).module
    for k, v in state.items():
        assert torch.equal(module.state_dict()[k], v), k
    random_init = load_model("torchvision:resnet18").module
    assert not torch.equal(random_init.conv1.weight, state["conv1.weight"])


def test_missing_weights_say_how_to_get_them(hub):
    with pytest.raises(ModelSpecError, match="nothing is downloaded at run time") as e:
        load_model("torchvision:resnet18", PRETRAINED)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and "--weights FILE" in msg and "\n" not in msg
    res = CliRunner().invoke(app, ["inspect", "torchvision:resnet18", "--pretrained", "--json"])
    assert res.exit_code == 1 and "nothing is downloaded" in res.output and "Traceback" not in res.output


def test_pretrained_needs_a_library_model_and_excludes_weights(tmp_path, hub):
    with pytest.raises(ModelSpecError, match="applies to torchvision:NAME and timm:NAME"):
        load_model("models/digits_cnn.py:digits_cnn", PRETRAINED)
    f = tmp_path / "w.pt"
    torch.save({}, f)
    res = CliRunner().invoke(app, ["inspect", "torchvision:resnet18", "--pretrained", "--weights", str(f)])
    assert res.exit_code == 1 and "pass one of them" in res.output


def test_search_config_records_pretrained(hub, monkeypatch):
    """The CLI passes --pretrained down as the weights argument (what result.json's config then says)."""
    seen = {}

    def fake_run_search(cfg, on_event=None):
        seen["weights"] = cfg.weights
        raise load.ModelSpecError("stop here")

    monkeypatch.setattr("onnxconet.commands.search.run_search", fake_run_search)
    res = CliRunner().invoke(app, ["search", "torchvision:resnet18", "--pretrained", "--json"])
    assert res.exit_code == 1 and seen == {"weights": PRETRAINED}
