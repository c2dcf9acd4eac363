"""Inputs tools/fuzz_inputs.py found that did not end in one clean line: each now exits 1 with one "error:" line
naming the file and what to do (and nothing else on stderr). Hand-built ONNX files only: no export, fast."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnxconet.cli import app
from tests.onnx_builders import small_residual as small_model

runner = CliRunner()


def save(model: onnx.ModelProto, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def one_error(args: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 1 with exactly one stderr line, an "error:" line holding every needle."""
    r = runner.invoke(app, args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1, (r.exit_code, r.stderr, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_small_model_prunes(tmp_path):
    """The base model of the cases below is fine: prune writes it."""
    r = runner.invoke(
        app, ["prune", save(small_model(), tmp_path / "m.onnx"), "--out", str(tmp_path / "p.onnx")]
    )
    assert r.exit_code == 0, r.stderr


def test_prune_model_onnxruntime_cannot_run(tmp_path):
    """A node reads a tensor nobody produces: one error saying the model itself does not run (before: every group
    frozen with a warning each, then the pruned file's error)."""
    m = small_model()
    m.graph.node[1].input[0] = "no_such_tensor"
    path = save(m, tmp_path / "dangling.onnx")
    one_error(["prune", path, "--out", str(tmp_path / "p.onnx")], path, "cannot run the model itself")


def test_prune_model_with_two_inputs(tmp_path):
    """A second graph input: one error naming both inputs (before: warnings, then onnxruntime's missing feed)."""
    m = small_model()
    m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 3, 8, 8]))
    path = save(m, tmp_path / "two.onnx")
    one_error(["prune", path, "--out", str(tmp_path / "p.onnx")], path, "2 inputs", "x, extra")


def test_initializer_with_unknown_element_type(tmp_path):
    """data_type 1234: one error naming the initializer (before: internal error KeyError: 1234)."""
    m = small_model()
    m.graph.initializer[2].data_type = 1234
    path = save(m, tmp_path / "dtype.onnx")
    one_error(
        ["prune", path, "--out", str(tmp_path / "p.onnx")], path, "conv2.weight", "unknown element type"
    )


@pytest.mark.parametrize("dims", [[2**40, 8, 3, 3], [8, 8, 3, 3, 2], [0, 8, 3, 3], [-8, 8, 3, 3]])
def test_initializer_dims_disagree_with_its_data(tmp_path, dims):
    """Declared dims that do not match the stored bytes (huge, an extra axis, zero, negative): the file is named as
    damaged (before: inspect printed groups of a 2**40-channel conv, or an internal error)."""
    m = small_model()
    t = m.graph.initializer[2]
    del t.dims[:]
    t.dims.extend(dims)
    path = save(m, tmp_path / "dims.onnx")
    one_error(["inspect", path], path, "conv2.weight", "re-export")


def test_profile_unreadable_onnx_is_one_error(tmp_path):
    """A truncated file: the reader's error alone (before: a warning that FLOPs were not counted, then
    onnxruntime's protobuf error)."""
    data = small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    one_error(["profile", str(path), "--provider", "cpu", "--threads", "1", "--seconds", "0.05"], str(path))


def test_huge_declared_channel_count_is_refused_not_allocated(tmp_path):
    """The input declares 2**40 channels (run at --input-shape 1,3,8,8): one id per channel would fill the
    memory; one error naming the file instead (before: internal error MemoryError, or the memory filled)."""
    m = small_model()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40
    path = save(m, tmp_path / "channels.onnx")
    one_error(["inspect", path, "--input-shape", "1,3,8,8"], path, "1099511627776 channels")


@pytest.mark.parametrize("axis, value", [(2, 2**40), (0, 2**31), (3, -1)])
def test_prune_declared_input_shape_that_cannot_run(tmp_path, axis, value):
    """A declared input of 2**40 rows, 2**31 images or a negative width: one error asking for --input-shape
    (before: every group frozen with a warning while allocating the input failed, then an internal error)."""
    m = small_model()
    m.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = value
    path = save(m, tmp_path / "shape.onnx")
    one_error(["prune", path, "--out", str(tmp_path / "p.onnx")], path, "declares shape", "--input-shape")
