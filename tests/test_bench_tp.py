"""tools/bench_tp.py's bisection of Torch-Pruning's ratio to the budget, with pruning and measuring replaced by a
table (no torch-pruning needed): what ships when a step fits, and when none does."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from onnxconet.latency.profile import Target

ROOT = Path(__file__).resolve().parents[1]


def _bench_tp(monkeypatch, read: dict[float, float], half: float = 0.0):
    """tools/bench_tp.py with `prune(ratio)` a marker module and its deployed ratio read from `read` (nearest
    pruning ratio), each figure with a CI of +- `half`."""
    spec = importlib.util.spec_from_file_location("bench_tp", ROOT / "tools" / "bench_tp.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_tp", mod)  # its dataclass looks its module up there
    spec.loader.exec_module(mod)

    class Marked(nn.Module):
        def __init__(self, ratio):
            super().__init__()
            self.ratio = ratio

    def measured(_judge, onnx_bytes, _budget):
        r = float(onnx_bytes.decode())
        ratio = read[min(read, key=lambda k: abs(k - r))]
        return SimpleNamespace(ratio=ratio, ratio_ci=[ratio - half, ratio + half])

    exported = lambda m, _shape: SimpleNamespace(  # noqa: E731
        SerializeToString=lambda: str(getattr(m, "ratio", 0.0)).encode()
    )
    monkeypatch.setattr(mod, "prune", lambda _t, _s, _k, r: Marked(r))
    monkeypatch.setattr(mod, "export_onnx", exported)
    monkeypatch.setattr(mod, "deciding", measured)
    monkeypatch.setattr(mod, "LatencyJudge", lambda *a, **k: None)
    return mod


def _pruned(mod, budget):
    target = Target(provider="cpu", threads=1)
    return mod.prune_to_budget(nn.Identity(), (1, 1, 8, 8), "magnitude", budget, target)


def test_no_step_fits_ships_the_step_that_measured_lowest_not_the_last(monkeypatch):
    """When no pruning ratio fits, the lowest-reading step ships (reported as missed): at 0.98 Torch-Pruning's
    global ranking left a network at 0.71 of the teacher, where 0.9 read 0.26 (6021f4d9df, seed 0 at 0.3)."""
    mod = _bench_tp(monkeypatch, {0.9: 0.26, 0.95: 0.307, 0.98: 0.71}, half=0.04)
    out = _pruned(mod, 0.3)
    assert out.pruning_ratio == 0.9 and out.latency_ratio == 0.26 and out.model.ratio == 0.9
    assert [s[0] for s in out.steps] == [0.9, 0.95, 0.98]  # all three were tried
    assert out.latency_ratio + 2 * 0.04 > 0.3  # and it does not fit: the bench reports it as missed


def test_bisection_keeps_the_least_pruning_that_fits(monkeypatch):
    """With a step that fits, the bisection ends on the least pruning whose ratio plus its room is within the
    budget."""
    read = {r / 100: 1.0 - r / 100 for r in range(0, 100)}  # the ratio falls as pruning grows
    mod = _bench_tp(monkeypatch, read, half=0.01)
    out = _pruned(mod, 0.5)
    assert out.latency_ratio + 0.02 <= 0.5  # fits
    # the least pruning that fits, to the table's step
    assert out.pruning_ratio == pytest.approx(0.52, abs=0.01)
    assert out.model.ratio == out.pruning_ratio


def test_rebuild_writes_the_cells_architecture_and_its_teacher(monkeypatch, tmp_path):
    """`python tools/bench_tp.py SPEC WEIGHTS CELL --out DIR` prunes the teacher with the cell's importance and
    ratio and writes both files, so a cell's deployed ratio can be measured again."""
    import json

    import onnx
    import torch

    from onnxconet.graph.export import export_onnx
    from onnxconet.prepare import prepare

    mod = _bench_tp(monkeypatch, {0.5: 0.5})
    monkeypatch.setattr(mod, "export_onnx", export_onnx)  # the real export, which _bench_tp replaced
    spec = "models/digits_cnn.py:digits_cnn"
    teacher = prepare(spec).loaded.module
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    asked = []

    def pruned(t, shape, kind, ratio):
        asked.append((kind, ratio, shape))
        return nn.Sequential(t, nn.Softmax(dim=1))  # any change the file shows

    monkeypatch.setattr(mod, "prune", pruned)
    cell = {"key": {"strategy": "tp-groupnorm"}, "pruning_ratio": 0.66796875}
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    mod.main([spec, str(tmp_path / "t.pt"), str(tmp_path / "cell.json"), "--out", str(tmp_path / "o")])
    assert [a[:2] for a in asked] == [("groupnorm", 0.66796875)]
    ops = lambda f: [n.op_type for n in onnx.load(tmp_path / "o" / f).graph.node]  # noqa: E731
    assert ops("pruned.onnx") == ops("teacher.onnx") + ["Softmax"]


def test_rebuild_refuses_a_cell_that_is_not_torch_prunings(monkeypatch, tmp_path, capsys):
    """A cell of another strategy has no pruning ratio: one line naming the file, not a KeyError."""
    import json

    mod = _bench_tp(monkeypatch, {0.5: 0.5})
    (tmp_path / "cell.json").write_text(json.dumps({"key": {"strategy": "l1"}, "test_acc": 0.9}))
    with pytest.raises(SystemExit) as exc:
        mod.main(
            ["models/digits_cnn.py:digits_cnn", "t.pt", str(tmp_path / "cell.json"), "--out", str(tmp_path)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cell.json: not a finished tp-* cell" in err and "'l1'" in err
