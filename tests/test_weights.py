"""--weights: a file that needs unpickling is refused in our words (never torch's advice to unpickle it, no
library warning on the way); keys of training-only heads the exported graph never uses load with a warning."""

from __future__ import annotations

import logging
import pickle
import warnings

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from onnxconet.cli import app
from onnxconet.errors import ModelSpecError
from onnxconet.load import load_model
from tests.conftest import TINY

runner = CliRunner()


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_file_with_code_in_it_is_refused_in_one_line(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"stem.0.weight": torch.zeros(1), "x": Evil()}, evil)
    r = runner.invoke(app, ["inspect", TINY, "--weights", str(evil)])
    assert r.exit_code == 1 and "pwned" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [
        f"error: --weights {evil} refused: it holds Python objects that could run code when unpickled (print); "
        "save only the state_dict: torch.save(model.state_dict(), path)"
    ]
    assert "weights_only" not in r.output and "safe_globals" not in r.output  # no advice to unpickle it


def test_a_plain_pickle_is_refused_without_a_library_warning(tmp_path):
    plain = tmp_path / "plain.pkl"
    with open(plain, "wb") as f:
        pickle.dump({"stem.0.weight": torch.zeros(1), "x": Evil()}, f, protocol=4)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ModelSpecError, match="refused") as e:
            load_model(TINY, weights=str(plain))
    assert not shown, [str(w.message) for w in shown]  # torch warns about the pickle protocol otherwise
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def _googlenet_state(tmp_path, **edit) -> str:
    """torchvision's googlenet as a user saves it: aux heads included (their default without weights)."""
    state = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    for k, v in edit.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    path = tmp_path / "googlenet.pt"
    torch.save(state, path)
    return str(path)


def test_googlenet_aux_heads_load_with_a_warning(tmp_path, caplog):
    path = _googlenet_state(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_model("torchvision:googlenet", weights=path)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "aux1, aux2" in said[0] and "\n" not in said[0], said
    saved = torch.load(path, weights_only=True)
    assert all(
        torch.equal(v, saved[k]) for k, v in loaded.module.state_dict().items()
    )  # every used key loaded
    assert not any(k.startswith("aux") for k in loaded.module.state_dict())


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"conv1.conv.weight": None}, 'Missing key(s) in state_dict: "conv1.conv.weight"'),  # a used module
        ({"head.weight": torch.zeros(1)}, 'Unexpected key(s) in state_dict: "head.weight"'),  # no aux head
    ],
)
def test_googlenet_keys_that_do_not_fit_stay_an_error(tmp_path, edit, needle):
    path = _googlenet_state(tmp_path, **edit)
    with pytest.raises(ModelSpecError, match="does not fit the model") as e:
        load_model("torchvision:googlenet", weights=path)
    assert needle in str(e.value)


@pytest.mark.parametrize("edit", ["int_keys", "non_tensor"])
def test_a_dict_that_is_no_state_dict_is_one_error(tmp_path, edit):
    """tools/fuzz_inputs.py's weights-keys case: integer keys reached torch's load_state_dict (AttributeError)."""
    state = load_model(TINY).module.state_dict()
    bad = dict(enumerate(state.values())) if edit == "int_keys" else {**state, "note": "trained 3 epochs"}
    path = tmp_path / "w.pt"
    torch.save(bad, path)
    with pytest.raises(
        ModelSpecError, match=r"expected a state_dict \(tensors by parameter name\), found the "
    ):
        load_model(TINY, weights=str(path))
