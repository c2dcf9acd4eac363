"""Fuzz the inputs of the CLI: mutated ONNX files, weights files and data folders through `inspect`, `prune`,
`profile` and `search`.

Every case must end cleanly: exit 0, or exit 1 with exactly one line on stderr that starts with "error:" (not
"internal error:", which means an exception nobody anticipated), no Python traceback, no hang (--timeout CPU
seconds per case, its processes together, and --wall-timeout for a case stuck without using CPU: on a busy
machine a niced case can wait long for a core without being stuck), no memory blow-up (--rss-mb: the peak
resident memory of any process of the case; the case is killed past it, and the address space of each is
capped at --rss-mb + 8 GiB). Cases marked "must refuse" (external
data outside the model's folder, pickles that would run code) must exit 1, and the harmless payload of a
pickle (it would create a marker file) must not have run.

Classes of cases (a case is one mutated input through one command; commands are cycled within a class):

    onnx-bitflip     bits flipped in an exported or hand-built ONNX file
    onnx-truncate    truncated, empty, random, text, zip, a folder or a device named *.onnx
    onnx-dtype       wrong element types of the input, output or an initializer
    onnx-dims        zero, negative, huge declared dims; wrong ranks; initializer dims that disagree with data
    onnx-op          unknown ops and domains, bad opsets and IR versions, dangling or cyclic edges
    onnx-inputs      several graph inputs, none, an input named like an initializer
    onnx-dynamic     symbolic and unknown dims (batch, channels, spatial), with and without --input-shape
    onnx-external    external data: in the folder (fine), outside it, absolute, missing, symlinked, short
    weights-keys     state_dicts with missing, extra, renamed or nested keys (and good ones)
    weights-shapes   state_dicts with tensors of the wrong shape or dtype
    weights-corrupt  truncated, bit-flipped, empty, random, a folder, an ONNX file as --weights
    weights-pickle   pickles that would run code (harmless payload), whole modules, plain objects
    data-idx         MNIST-style IDX folders: wrong magic, truncated, mismatched, huge headers, bad gzip
    data-folder      ImageFolder trees: empty, empty classes, corrupt or fake images, one image per class
    data-npz         npz files without x / y, wrong shapes and dtypes, object arrays with code, truncated
    data-misc        CIFAR batches (code, truncated, wrong shapes), unknown data specs, missing paths

Two ways to run a case. `--mode worker` (default): one long-lived child process imports onnxconet once and runs
the cases through the typer app (typer.testing.CliRunner), stdout/stderr captured at the file-descriptor level
too (so onnxruntime's or protobuf's own writes count); the parent watches each case's time and the resident
memory of the child and its runner subprocesses, kills the process group on a hang or a blow-up and starts a new
child. `--mode subprocess`: every case is `python -m onnxconet ...`, the real entry point (a few seconds more
per case for the imports). Both use this checkout's onnxconet (PYTHONPATH is set to the repository root).

Cases are reproducible: case i of seed S draws its mutation from Random(f"{S}/{i}"), and the base files are
built deterministically; `--only ID,...` reruns single cases. Files go to OUT/cases/ID/, one JSON line per case
to OUT/results.jsonl, the summary to OUT/summary.txt.

Examples:

    nice -n 19 python tools/fuzz_inputs.py --cases 320 --out /tmp/fuzz
    nice -n 19 python tools/fuzz_inputs.py --cases 32 --mode subprocess --out /tmp/fuzz-sub
    nice -n 19 python tools/fuzz_inputs.py --out /tmp/fuzz --only onnx-dims-0004,data-npz-0014
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import random
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_SPEC = str(ROOT / "tests" / "data" / "tiny_models.py") + ":tiny_res"  # 3x16x16 in, 5 classes
DIGITS_SPEC = str(ROOT / "models" / "digits_cnn.py") + ":digits_cnn"  # 1x32x32 in, 10 classes
COMMANDS = ("inspect", "prune", "profile", "search")
AS_SLACK = 8 << 30  # address space beyond the RSS bound (torch maps a few GiB it never touches)
MARKER = "PWNED"


# ----------------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    """One input through one command. `expect`: "ok" (must exit 0), "refuse" (must exit 1) or "any"."""

    id: str
    cls: str
    variant: str
    command: str
    args: list[str]
    input: str
    expect: str = "any"
    marker: str | None = None  # a file the command must not create (a pickle's payload)


@dataclass
class Outcome:
    id: str
    cls: str
    command: str
    variant: str
    input: str
    args: list[str]
    exit_code: int | None
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    stderr: str
    stdout_tail: str
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


class Bases:
    """The valid inputs every mutation starts from, built once into OUT/base (deterministic)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        import numpy as np
        import onnx
        import torch

        self.np, self.onnx, self.torch = np, onnx, torch
        self.onnx_files: dict[str, Path] = {}
        for name, spec, shape in (
            ("tiny", TINY_SPEC, (1, 3, 16, 16)),
            ("digits", DIGITS_SPEC, (1, 1, 32, 32)),
        ):
            p = folder / f"{name}.onnx"
            if not p.is_file():
                onnx.save(self._export(spec, shape), str(p))
            self.onnx_files[name] = p
        p = folder / "built.onnx"
        if not p.is_file():
            onnx.save(self._built(), str(p))
        self.onnx_files["built"] = p
        self.weights = folder / "tiny_state.pt"
        if not self.weights.is_file():
            torch.save(self.tiny_module().state_dict(), self.weights)

    def tiny_module(self):
        from onnxconet.load import load_model

        self.torch.manual_seed(0)
        return load_model(TINY_SPEC).module

    def _export(self, spec: str, shape):
        from onnxconet.graph.export import export_onnx
        from onnxconet.load import load_model

        self.torch.manual_seed(0)
        return export_onnx(load_model(spec).module, shape, name=spec)

    def _built(self):
        """Conv-Relu-Conv-Add(residual)-GlobalAveragePool-Flatten-Gemm, opset 20, by hand (tests/onnx_builders.py)."""
        sys.path.insert(0, str(ROOT))
        from tests.onnx_builders import small_residual

        return small_residual()

    def load(self, name: str):
        return self.onnx.load(str(self.onnx_files[name]))


def _common_search(model: str, data: str, out: Path) -> list[str]:
    return [
        "search", model, "--data", data, "--trials", "1", "--final-epochs", "0", "--budget-on", "flops",
        "--pretrain-epochs", "1", "--epochs-per-trial", "1", "--batch-size", "32", "--provider", "cpu",
        "--threads", "1", "--latency-seconds", "0.05", "--out", str(out / "run"),
    ]  # fmt: skip


def command_args(command: str, target: str, d: Path, rng: random.Random, extra=()) -> list[str]:
    """The CLI arguments of `command` on `target` with small, fast settings; outputs go to `d`."""
    if command == "inspect":
        args = ["inspect", target] + (["--json"] if rng.random() < 0.5 else [])
    elif command == "prune":
        args = [
            "prune",
            target,
            "--ratio",
            str(rng.choice([0.25, 0.5, 0.75])),
            "--out",
            str(d / "pruned.onnx"),
        ]
    elif command == "profile":
        args = ["profile", target, "--provider", "cpu", "--threads", "1", "--seconds", "0.05"]
    else:
        args = _common_search(target, "digits", d)
    return args + list(extra)


# ----- ONNX mutations: each takes (bases, rng, case folder) and returns (variant, path, expect, extra args)


def _save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _base(b: Bases, rng: random.Random, names=("tiny", "built", "digits")):
    name = rng.choice(names)
    return name, b.load(name)


def onnx_bitflip(b, rng, d):
    name = rng.choice(["tiny", "built", "built", "digits"])
    data = bytearray(b.onnx_files[name].read_bytes())
    k = rng.choice([1, 1, 2, 4, 8, 32])
    # digits' weights are most of its bytes: aim half of its flips at the first 4 KiB (the graph structure)
    span = 4096 if name == "digits" and rng.random() < 0.5 else len(data)
    flips = sorted(rng.randrange(min(span, len(data)) * 8) for _ in range(k))
    for bit in flips:
        data[bit // 8] ^= 1 << (bit % 8)
    p = d / f"{name}_flip.onnx"
    p.write_bytes(bytes(data))
    return f"{name}.onnx, {k} bit(s) flipped (first at byte {flips[0] // 8})", p, "any", []


def onnx_truncate(b, rng, d):
    name = rng.choice(["tiny", "built", "digits"])
    data = b.onnx_files[name].read_bytes()
    p = d / f"{name}_cut.onnx"
    kind = rng.choice(
        ["cut", "cut", "cut", "empty", "one", "random", "text", "zip", "folder", "device", "gz"]
    )
    if kind == "cut":
        n = rng.randrange(1, len(data))
        p.write_bytes(data[:n])
        return f"{name}.onnx cut to {n} of {len(data)} bytes", p, "any", []
    if kind == "empty":
        p.write_bytes(b"")
        return "empty file", p, "refuse", []
    if kind == "one":
        p.write_bytes(data[:-1])
        return f"{name}.onnx without its last byte", p, "any", []
    if kind == "random":
        n = rng.choice([1, 7, 100, 5000])
        p.write_bytes(rng.randbytes(n))
        return f"{n} random bytes", p, "any", []
    if kind == "text":
        p.write_text("this is not an ONNX model\n" * rng.randint(1, 50))
        return "a text file", p, "refuse", []
    if kind == "zip":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("model.onnx", data)
        return f"{name}.onnx inside a zip archive", p, "refuse", []
    if kind == "gz":
        p.write_bytes(gzip.compress(data, mtime=0))
        return f"{name}.onnx gzipped", p, "refuse", []
    if kind == "folder":
        p.mkdir()
        return "a folder named *.onnx", p, "refuse", []
    target = rng.choice(["/dev/zero", "/dev/null", "/dev/urandom"])
    p.symlink_to(target)
    return f"a symlink to {target}", p, "refuse", []


def onnx_dtype(b, rng, d):
    from onnx import TensorProto as T

    name, m = _base(b, rng)
    dtype = rng.choice(
        [T.INT64, T.UINT8, T.FLOAT16, T.DOUBLE, T.STRING, T.BOOL, T.BFLOAT16, T.COMPLEX64, 0, 1234]
    )
    where = rng.choice(["input", "output", "initializer", "initializer"])
    if where == "input":
        m.graph.input[0].type.tensor_type.elem_type = dtype
    elif where == "output":
        m.graph.output[0].type.tensor_type.elem_type = dtype
    else:
        t = rng.choice([t for t in m.graph.initializer if len(t.dims) >= 1])
        t.data_type = dtype
        where = f"initializer {t.name}"
    p = _save(m, d / f"{name}_dtype.onnx")
    return f"{name}.onnx, {where} element type {dtype}", p, "any", []


HUGE = [0, -1, -7, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1]


def onnx_dims(b, rng, d):
    name, m = _base(b, rng)
    g = m.graph
    kind = rng.choice(["input", "input", "output", "value_info", "rank", "init", "init", "init_zero"])
    value = rng.choice(HUGE)
    if kind in ("input", "output") or (kind == "value_info" and not g.value_info):
        vi = g.input[0] if kind != "output" else g.output[0]
        dims = vi.type.tensor_type.shape.dim
        k = rng.randrange(len(dims))
        dims[k].Clear()
        dims[k].dim_value = value
        what = f"{kind} dim {k} = {value}"
    elif kind == "value_info":
        vi = rng.choice([v for v in g.value_info if v.type.tensor_type.shape.dim] or list(g.value_info))
        dims = vi.type.tensor_type.shape.dim
        k = rng.randrange(max(len(dims), 1))
        if dims:
            dims[k].Clear()
            dims[k].dim_value = value
        what = f"value_info {vi.name} dim {k} = {value}"
    elif kind == "rank":
        dims = g.input[0].type.tensor_type.shape.dim
        if rng.random() < 0.5:
            del dims[rng.randrange(len(dims))]
            what = "input rank 3"
        else:
            dims.add().dim_value = rng.choice([1, 3])
            what = "input rank 5"
    else:
        t = rng.choice([t for t in g.initializer if len(t.dims) >= 1])
        k = rng.randrange(len(t.dims))
        t.dims[k] = 0 if kind == "init_zero" else value
        what = f"initializer {t.name} dim {k} = {t.dims[k]} (data unchanged)"
    p = _save(m, d / f"{name}_dims.onnx")
    extra = []
    if rng.random() < 0.2 and kind in ("input", "rank"):
        extra = ["--input-shape", rng.choice(["1,3,16,16", "1,1,32,32", "1,3,8,8", "2,3,16,16"])]
    return f"{name}.onnx, {what}", p, "any", extra


def onnx_op(b, rng, d):
    from onnx import helper

    name, m = _base(b, rng)
    g = m.graph
    node = rng.choice(list(g.node))
    kind = rng.choice(
        ["op", "op", "domain", "domain_declared", "opset", "no_opset", "ir", "dangling", "cycle", "dup_out",
         "empty_op", "if_no_branch"]
    )  # fmt: skip
    if kind == "op":
        node.op_type = rng.choice(["NotAnOp", "Conv2d", "conv", "Relu6", "X" * 300])
        what = f"node {node.name} op -> {node.op_type[:20]}"
    elif kind == "empty_op":
        node.op_type = ""
        what = f"node {node.name} op -> ''"
    elif kind in ("domain", "domain_declared"):
        node.domain = rng.choice(["com.example.unknown", "ai.onnx.ml", "com.microsoft", "x" * 50])
        if kind == "domain_declared":
            m.opset_import.append(helper.make_opsetid(node.domain, 1))
        what = f"node {node.name} ({node.op_type}) domain -> {node.domain[:30]}" + (
            " (declared)" if kind == "domain_declared" else ""
        )
    elif kind == "opset":
        v = rng.choice([1, 6, 99, 10**9])
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = v
        what = f"default opset {v}"
    elif kind == "no_opset":
        del m.opset_import[:]
        what = "no opset_import"
    elif kind == "ir":
        m.ir_version = rng.choice([0, 1, 3, 99, 2**40])
        what = f"ir_version {m.ir_version}"
    elif kind == "dangling":
        node = rng.choice([n for n in g.node if n.input])
        node.input[0] = "no_such_tensor"
        what = f"node {node.name} input 0 -> a tensor nobody produces"
    elif kind == "cycle":
        node = rng.choice([n for n in g.node if n.input])
        node.input[0] = node.output[0]
        what = f"node {node.name} reads its own output"
    elif kind == "dup_out":
        other = rng.choice([n for n in g.node if n is not node])
        node.output[0] = other.output[0]
        what = f"node {node.name} writes {other.name}'s output"
    else:
        node.op_type = "If"
        del node.attribute[:]
        what = f"node {node.name} -> If without branches"
    p = _save(m, d / f"{name}_op.onnx")
    return f"{name}.onnx, {what}", p, "any", []


def onnx_inputs(b, rng, d):
    from onnx import TensorProto, helper

    name, m = _base(b, rng, ("tiny", "built"))
    g = m.graph
    first = g.input[0]
    dims = [x.dim_value for x in first.type.tensor_type.shape.dim]
    kind = rng.choice(["unused", "unused_int", "used", "dup_name", "shadow_init", "none", "removed"])
    if kind in ("unused", "unused_int"):
        t = TensorProto.FLOAT if kind == "unused" else TensorProto.INT64
        g.input.append(helper.make_tensor_value_info("extra", t, dims))
        if rng.random() < 0.5:  # the new input first
            order = [g.input[-1], *g.input[:-1]]
            del g.input[:]
            g.input.extend(order)
        what = f"a second, unused {'float' if t == TensorProto.FLOAT else 'int64'} input"
    elif kind == "used":
        g.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, dims))
        g.node.append(helper.make_node("Add", [first.name, "extra"], ["x_plus"], name="add_extra"))
        consumer = next(n for n in g.node if first.name in n.input and n.name != "add_extra")
        consumer.input[list(consumer.input).index(first.name)] = "x_plus"
        # keep the graph topologically sorted: the Add first
        add = g.node.pop()
        nodes = [add, *g.node]
        del g.node[:]
        g.node.extend(nodes)
        what = "a second input added to the first"
    elif kind == "dup_name":
        g.input.append(first)
        what = "the input declared twice"
    elif kind == "shadow_init":
        t = rng.choice(list(g.initializer))
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        what = f"initializer {t.name} also a graph input"
    elif kind == "none":
        del g.input[:]
        what = "no graph inputs"
    else:
        g.input.pop(0)
        g.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, dims))
        what = "the consumed input replaced by an unrelated one"
    p = _save(m, d / f"{name}_inputs.onnx")
    return f"{name}.onnx, {what}", p, "any", []


def onnx_dynamic(b, rng, d):
    name, m = _base(b, rng)
    g = m.graph
    dims = g.input[0].type.tensor_type.shape.dim
    which = rng.choice(["batch", "channels", "spatial", "all", "unknown", "output"])
    axes = {"batch": [0], "channels": [1], "spatial": [2, 3], "all": [0, 1, 2, 3], "unknown": [0, 2]}.get(
        which
    )
    if which == "output":
        od = g.output[0].type.tensor_type.shape.dim
        od[0].Clear()
        od[0].dim_param = "N"
    else:
        for k in axes:
            dims[k].Clear()
            if which != "unknown":
                dims[k].dim_param = "NCHW"[k]
    if rng.random() < 0.4:
        del g.value_info[:]
        which += ", value_info dropped"
    real = {"tiny": "1,3,16,16", "built": "1,3,8,8", "digits": "1,1,32,32"}[name]
    shape = rng.choice([None, None, real, "2," + real.split(",", 1)[1], "1,3,5,5", "1,7,16,16", "1,3,16"])
    extra = ["--input-shape", shape] if shape else []
    p = _save(m, d / f"{name}_dyn.onnx")
    return (
        f"{name}.onnx, symbolic {which} dims" + (f", --input-shape {shape}" if shape else ""),
        p,
        "any",
        extra,
    )


def onnx_external(b, rng, d):
    from onnx.external_data_helper import set_external_data

    name, m = _base(b, rng, ("tiny", "built", "digits"))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    raw = t.raw_data
    model_dir = d / "model"
    model_dir.mkdir()
    outside = d / f"outside_{t.name.replace('/', '_')}.bin"
    kind = rng.choice(
        ["inside", "inside", "parent", "absolute", "abs_system", "missing", "symlink", "short", "offset",
         "huge_length", "dir", "dotdot_sub", "empty_loc"]
    )  # fmt: skip
    expect = "refuse"
    location, offset, length = "weights.bin", None, None
    if kind == "inside":
        (model_dir / location).write_bytes(raw)
        expect = "ok"
    elif kind == "parent":
        outside.write_bytes(raw)
        location = "../" + outside.name
    elif kind == "absolute":
        outside.write_bytes(raw)
        location = str(outside)
    elif kind == "abs_system":
        location = rng.choice(["/etc/hostname", "/etc/passwd", "/proc/self/environ"])
    elif kind == "missing":
        location = "missing.bin"
    elif kind == "symlink":
        outside.write_bytes(raw)
        (model_dir / location).symlink_to(outside)
    elif kind == "short":
        (model_dir / location).write_bytes(raw[: len(raw) // 2])
    elif kind == "offset":
        (model_dir / location).write_bytes(raw)
        offset = len(raw) + rng.choice([1, 4096, 2**40])
    elif kind == "huge_length":
        (model_dir / location).write_bytes(raw)
        length = rng.choice([2**31, 2**40, 2**62])
    elif kind == "dir":
        (model_dir / "sub").mkdir()
        location = "sub"
    elif kind == "dotdot_sub":
        (model_dir / "sub").mkdir()
        outside.write_bytes(raw)
        location = "sub/../../" + outside.name
    else:
        location = ""
    set_external_data(t, location=location, offset=offset, length=length)
    t.ClearField("raw_data")
    p = _save(m, model_dir / f"{name}_ext.onnx")
    how = (
        f"location {location!r}"
        + (f", offset {offset}" if offset else "")
        + (f", length {length}" if length else "")
    )
    return f"{name}.onnx, {t.name} as external data, {kind}: {how}", p, expect, []


# ----- weights mutations: (bases, rng, case folder) -> (variant, path, expect, marker)


class _Payload:
    """Unpickling it calls `fn(*args)`: harmless here (create a marker folder, read the pid)."""

    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _state(b: Bases):
    return b.torch.load(b.weights, weights_only=True)


def weights_keys(b, rng, d):
    torch = b.torch
    sd = _state(b)
    keys = list(sd)
    kind = rng.choice(["good", "nested", "drop", "extra", "rename", "prefix", "empty_dict", "wrapped_other",
                       "int_keys", "nested_bad"])  # fmt: skip
    expect = "refuse"
    if kind == "good":
        obj, expect = sd, "ok"
    elif kind == "nested":
        obj, expect = {"state_dict": sd, "epoch": 3}, "ok"
    elif kind == "drop":
        k = rng.choice(keys)
        obj = {x: v for x, v in sd.items() if x != k}
        kind += f" {k}"
    elif kind == "extra":
        obj = dict(sd) | {"aux.fc.weight": torch.zeros(3, 3)}
    elif kind == "rename":
        k = rng.choice(keys)
        obj = {(x + "_renamed" if x == k else x): v for x, v in sd.items()}
        kind += f" {k}"
    elif kind == "prefix":
        obj = {"module." + x: v for x, v in sd.items()}
    elif kind == "empty_dict":
        obj = {}
    elif kind == "wrapped_other":
        obj = {"model": sd}
    elif kind == "int_keys":
        obj = {i: v for i, v in enumerate(sd.values())}
    else:
        obj = {"state_dict": {"x": torch.zeros(1)}}
    p = d / "weights.pt"
    torch.save(obj, p)
    return f"state_dict: {kind}", p, expect, None


def weights_shapes(b, rng, d):
    torch = b.torch
    sd = _state(b)
    k = rng.choice([k for k, v in sd.items() if v.ndim >= 1])
    v = sd[k]
    kind = rng.choice(
        ["bigger", "smaller", "transposed", "flat", "scalar", "dtype", "dtype_int", "nan", "huge"]
    )
    expect = "refuse"
    if kind == "bigger":
        sd[k] = torch.zeros(v.shape[0] + 1, *v.shape[1:])
    elif kind == "smaller":
        sd[k] = torch.zeros(max(v.shape[0] - 1, 0), *v.shape[1:])
    elif kind == "transposed":
        sd[k] = v.t() if v.ndim == 2 else v.transpose(0, 1) if v.ndim > 2 else v.reshape(1, -1)
    elif kind == "flat":
        sd[k] = v.reshape(-1) if v.ndim > 1 else v.reshape(1, -1)
    elif kind == "scalar":
        sd[k] = torch.tensor(1.0)
    elif kind == "dtype":
        sd = {x: t.double() if t.is_floating_point() else t for x, t in sd.items()}
        expect = "ok"
    elif kind == "dtype_int":
        sd[k] = v.to(torch.int32)
        expect = "any"
    elif kind == "nan":
        sd[k] = torch.full_like(v, float("nan")) if v.is_floating_point() else v
        expect = "any"
    else:
        sd[k] = torch.zeros(1).expand(2**20)  # a big view of one element: saved small
    p = d / "weights.pt"
    torch.save(sd, p)
    return f"state_dict: {k} {kind}", p, expect, None


def weights_corrupt(b, rng, d):
    data = b.weights.read_bytes()
    p = d / "weights.pt"
    kind = rng.choice(
        ["cut", "cut", "flip", "flip", "empty", "random", "folder", "onnx", "npy", "missing", "text"]
    )
    if kind == "cut":
        n = rng.randrange(0, len(data))
        p.write_bytes(data[:n])
        kind += f" to {n} of {len(data)} bytes"
    elif kind == "flip":
        buf = bytearray(data)
        k = rng.choice([1, 4, 16])
        for _ in range(k):
            bit = rng.randrange(len(buf) * 8)
            buf[bit // 8] ^= 1 << (bit % 8)
        p.write_bytes(bytes(buf))
        kind += f" {k} bit(s)"
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "random":
        p.write_bytes(rng.randbytes(rng.choice([3, 100, 10000])))
    elif kind == "folder":
        p.mkdir()
    elif kind == "onnx":
        shutil.copy(b.onnx_files["tiny"], p)
    elif kind == "npy":
        with open(p, "wb") as f:
            b.np.save(f, b.np.zeros((3, 3), dtype=b.np.float32))
    elif kind == "missing":
        pass
    else:
        p.write_text("conv.weight: 1 2 3\n")
    return f"weights file: {kind}", p, "any" if kind.startswith("flip") else "refuse", None


def weights_pickle(b, rng, d):
    torch = b.torch
    marker = d / MARKER
    kind = rng.choice(["code_zip", "code_zip", "code_raw", "code_legacy", "exec_zip", "getpid", "module",
                       "nested_code", "plain_objects", "numpy_array"])  # fmt: skip
    evil = _Payload(os.mkdir, (str(marker),))
    if kind == "exec_zip":
        evil = _Payload(exec, (f"open({str(marker)!r}, 'w').close()",))
    p = d / "weights.pt"
    expect = "refuse"
    sd = _state(b)
    if kind in ("code_zip", "exec_zip"):
        torch.save({**sd, "evil": evil}, p)
    elif kind == "code_raw":
        p.write_bytes(pickle.dumps({**sd, "evil": evil}))
    elif kind == "code_legacy":
        torch.save({**sd, "evil": evil}, p, _use_new_zipfile_serialization=False)
    elif kind == "getpid":
        torch.save(_Payload(os.getpid, ()), p)
    elif kind == "module":
        torch.save(b.tiny_module(), p)
    elif kind == "nested_code":
        torch.save({"state_dict": sd, "optimizer": {"hook": evil}}, p)
    elif kind == "plain_objects":
        torch.save({"state_dict": sd, "epoch": 3, "note": "ok", "lr": [0.1]}, p)
        expect = "ok"
    else:
        torch.save({"state_dict": sd, "extra": b.np.zeros(3)}, p)
        expect = "any"
    return f"weights pickle: {kind}", p, expect, str(marker)


# ----- data mutations: (bases, rng, case folder) -> (variant, data spec, expect, marker)


def _idx_bytes(arr, magic_type=0x08) -> bytes:
    head = bytes([0, 0, magic_type, arr.ndim]) + b"".join(struct.pack(">i", n) for n in arr.shape)
    return head + arr.astype("uint8").tobytes()


def _good_idx(np, rng_np, n_train=60, n_test=20, hw=8):
    tx = rng_np.integers(0, 256, (n_train, hw, hw), dtype=np.uint8)
    ty = (np.arange(n_train) % 5).astype(np.uint8)
    vx = rng_np.integers(0, 256, (n_test, hw, hw), dtype=np.uint8)
    vy = (np.arange(n_test) % 5).astype(np.uint8)
    return {"train-images-idx3-ubyte": tx, "train-labels-idx1-ubyte": ty, "t10k-images-idx3-ubyte": vx,
            "t10k-labels-idx1-ubyte": vy}  # fmt: skip


def data_idx(b, rng, d):
    np = b.np
    rng_np = np.random.default_rng(rng.getrandbits(32))
    files = {k: _idx_bytes(v) for k, v in _good_idx(np, rng_np).items()}
    root = d / "idx"
    root.mkdir()
    name = rng.choice(sorted(files))
    kind = rng.choice(["good", "magic", "magic_type", "ndim", "cut_header", "cut_data", "long", "count",
                       "missing", "huge", "huge_under_guard", "gz_bad", "empty_images", "labels_99",
                       "sizes_differ", "folder_is_file"])  # fmt: skip
    expect = "refuse"
    data = files[name]
    if kind == "good":
        expect = "ok"
    elif kind == "magic":
        files[name] = b"\x12\x34" + data[2:]
    elif kind == "magic_type":
        files[name] = data[:2] + bytes([0x0D]) + data[3:]
    elif kind == "ndim":
        files[name] = data[:3] + bytes([data[3] + 1]) + data[4:]
    elif kind == "cut_header":
        files[name] = data[: rng.randrange(0, 4 + 4 * data[3])]
    elif kind == "cut_data":
        files[name] = data[: len(data) - rng.randint(1, 50)]
    elif kind == "long":
        files[name] = data + b"\0" * rng.randint(1, 50)
    elif kind == "count":
        files["train-labels-idx1-ubyte"] = _idx_bytes(np.arange(59) % 5)
        name = "train-labels-idx1-ubyte"
    elif kind == "missing":
        del files[name]
    elif kind == "huge":
        files[name] = data[:4] + struct.pack(">i", 2**31 - 1) + data[8:]
    elif kind == "huge_under_guard":
        name = "train-images-idx3-ubyte"
        files[name] = bytes([0, 0, 8, 3]) + struct.pack(">iii", 1000, 1000, 1000) + b"\0" * 64
    elif kind == "gz_bad":
        files[name + ".gz"] = gzip.compress(data, mtime=0)[:-10]
        del files[name]
    elif kind == "empty_images":
        files = {k: _idx_bytes(np.zeros((0, 8, 8) if "images" in k else (0,), np.uint8)) for k in files}
    elif kind == "labels_99":
        files["train-labels-idx1-ubyte"] = _idx_bytes(np.full(60, 99, np.uint8))
        name = "train-labels-idx1-ubyte"
    elif kind == "sizes_differ":
        files["t10k-images-idx3-ubyte"] = _idx_bytes(np.zeros((20, 9, 7), np.uint8))
        name = "t10k-images-idx3-ubyte"
    for k, v in files.items():
        (root / k).write_bytes(v)
    spec = f"{rng.choice(['mnist', 'fashion-mnist'])}:{root}"
    if kind == "folder_is_file":
        shutil.rmtree(root)
        root.write_bytes(b"not a folder")
    return f"IDX folder: {kind} ({name})", spec, expect, None


def _png(np, arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_folder(b, rng, d):
    np = b.np
    rng_np = np.random.default_rng(rng.getrandbits(32))
    root = d / "images"
    root.mkdir()
    kind = rng.choice(["good", "good_split", "empty", "empty_classes", "corrupt", "zero_bytes", "text_png",
                       "one_per_class", "val_extra_class", "bomb", "hidden_only", "missing", "file",
                       "cut_png"])  # fmt: skip
    expect = "refuse"
    classes = [f"c{i}" for i in range(5)]

    def fill(folder: Path, n: int = 4, cls=classes):
        for c in cls:
            (folder / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / c / f"{i}.png").write_bytes(
                    _png(np, rng_np.integers(0, 256, (12, 12, 3), dtype=np.uint8))
                )

    spec = str(root)
    if kind == "good":
        fill(root)
        expect = "ok"
    elif kind == "good_split":
        fill(root / "train")
        fill(root / "val", 2)
        expect = "ok"
    elif kind == "empty":
        pass
    elif kind == "empty_classes":
        for c in classes:
            (root / c).mkdir()
    elif kind in ("corrupt", "zero_bytes", "text_png", "cut_png", "bomb"):
        fill(root)
        victim = root / rng.choice(classes) / "1.png"
        if kind == "corrupt":
            buf = bytearray(victim.read_bytes())
            for _ in range(8):
                buf[rng.randrange(8, len(buf))] ^= 0xFF
            victim.write_bytes(bytes(buf))
            expect = "any"  # a flipped pixel is still a valid image
        elif kind == "zero_bytes":
            victim.write_bytes(b"")
        elif kind == "text_png":
            victim.write_text("not an image")
        elif kind == "cut_png":
            victim.write_bytes(victim.read_bytes()[:40])
            expect = "any"  # PIL reads the header only; a truncated body fails at training
        else:  # PNG header declaring 60000 x 60000 pixels
            import zlib

            ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
            chunk = b"IHDR" + ihdr
            victim.write_bytes(
                b"\x89PNG\r\n\x1a\n"
                + struct.pack(">I", len(ihdr))
                + chunk
                + struct.pack(">I", zlib.crc32(chunk))
            )
    elif kind == "one_per_class":
        fill(root, 1)
    elif kind == "val_extra_class":
        fill(root / "train")
        fill(root / "val", 2, classes + ["c_extra"])
    elif kind == "hidden_only":
        (root / ".ipynb_checkpoints").mkdir()
        fill(root / ".ipynb_checkpoints", 1, ["."])
    elif kind == "missing":
        spec = str(root / "nowhere")
    else:
        f = d / "images.txt"
        f.write_text("x")
        spec = str(f)
    return f"ImageFolder: {kind}", spec, expect, None


def data_npz(b, rng, d):
    np = b.np
    rng_np = np.random.default_rng(rng.getrandbits(32))
    n = 100
    x = rng_np.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    y = np.arange(n) % 5
    arrays = {"x": x, "y": y}
    marker = d / MARKER
    kind = rng.choice(["good", "hwc", "no_x", "no_y", "renamed", "y_2d", "y_float", "y_negative", "len_diff",
                       "x_1d", "x_2ch", "x_str", "x_object_code", "empty", "truncated", "not_zip",
                       "classes_10", "few", "x_int64", "x_inf"])  # fmt: skip
    expect = "refuse"
    path = d / "data.npz"
    if kind == "good":
        expect = "ok"
    elif kind == "hwc":
        arrays["x"] = x.transpose(0, 2, 3, 1)
        expect = "ok"
    elif kind == "no_x":
        del arrays["x"]
    elif kind == "no_y":
        del arrays["y"]
    elif kind == "renamed":
        arrays = {"images": x, "labels": y}
    elif kind == "y_2d":
        arrays["y"] = y[:, None]
    elif kind == "y_float":
        arrays["y"] = y.astype(np.float32)
    elif kind == "y_negative":
        arrays["y"] = y - 1
    elif kind == "len_diff":
        arrays["y"] = y[:-3]
    elif kind == "x_1d":
        arrays["x"] = x.reshape(-1)
    elif kind == "x_2ch":
        arrays["x"] = x[:, :2]
    elif kind == "x_str":
        arrays["x"] = np.array(["a"] * n)
    elif kind == "x_object_code":
        obj = np.empty(n, dtype=object)
        obj[0] = _Payload(os.mkdir, (str(marker),))
        arrays["x"] = obj
    elif kind == "empty":
        arrays = {"x": x[:0], "y": y[:0]}
    elif kind == "classes_10":
        arrays["y"] = np.arange(n) % 10
    elif kind == "few":
        arrays = {"x": x[:5], "y": y[:5]}
    elif kind == "x_int64":
        arrays["x"] = x.astype(np.int64)
    elif kind == "x_inf":
        arrays["x"] = np.full(x.shape, np.inf, dtype=np.float32)
        expect = "any"
    if kind not in ("truncated", "not_zip"):
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif kind == "truncated":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        path.write_bytes(data[: rng.randrange(1, len(data))])
    else:
        path.write_text("x,y\n1,2\n")
    return f"npz: {kind}", f"npz:{path}", expect, str(marker)


def data_misc(b, rng, d):
    np = b.np
    marker = d / MARKER
    kind = rng.choice(["cifar_code", "cifar_code", "cifar_cut", "cifar_shape", "cifar_missing", "cifar_not_dict",
                       "cifar_labels", "unknown_spec", "empty_spec_path", "npz_missing", "mnist_missing",
                       "cifar_empty_folder"])  # fmt: skip
    root = d / "cifar"
    root.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    good = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
    spec = f"cifar10:{root}"
    if kind.startswith("cifar") and kind != "cifar_empty_folder":
        for nm in names:
            (root / nm).write_bytes(pickle.dumps(good, protocol=2))
        victim = root / rng.choice(names)
        if kind == "cifar_code":
            victim.write_bytes(pickle.dumps({b"data": _Payload(os.mkdir, (str(marker),)), b"labels": [0]}))
        elif kind == "cifar_cut":
            victim.write_bytes(victim.read_bytes()[:50])
        elif kind == "cifar_shape":
            victim.write_bytes(pickle.dumps({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}))
        elif kind == "cifar_missing":
            victim.unlink()
        elif kind == "cifar_not_dict":
            victim.write_bytes(pickle.dumps([1, 2, 3]))
        elif kind == "cifar_labels":
            victim.write_bytes(pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [-1] * 10}))
    elif kind == "unknown_spec":
        spec = rng.choice(["imagenet:/data", "cifar10:", "npz:", "digits:8", "s3://bucket/x", "mnist"])
    elif kind == "empty_spec_path":
        spec = ""
    elif kind == "npz_missing":
        spec = f"npz:{d / 'none.npz'}"
    elif kind == "mnist_missing":
        spec = f"mnist:{d / 'none'}"
    return f"data: {kind}", spec, "refuse", str(marker)


ONNX_CLASSES: dict[str, Callable] = {
    "onnx-bitflip": onnx_bitflip, "onnx-truncate": onnx_truncate, "onnx-dtype": onnx_dtype,
    "onnx-dims": onnx_dims, "onnx-op": onnx_op, "onnx-inputs": onnx_inputs, "onnx-dynamic": onnx_dynamic,
    "onnx-external": onnx_external,
}  # fmt: skip
WEIGHTS_CLASSES: dict[str, Callable] = {
    "weights-keys": weights_keys, "weights-shapes": weights_shapes, "weights-corrupt": weights_corrupt,
    "weights-pickle": weights_pickle,
}  # fmt: skip
DATA_CLASSES: dict[str, Callable] = {
    "data-idx": data_idx, "data-folder": data_folder, "data-npz": data_npz, "data-misc": data_misc,
}  # fmt: skip
CLASSES = list(ONNX_CLASSES) + list(WEIGHTS_CLASSES) + list(DATA_CLASSES)


def make_case(b: Bases, seed: int, i: int, cls: str, nth: int, root: Path) -> Case:
    """Case `i` (the `nth` of its class): the class's mutation drawn from Random(f"{seed}/{i}")."""
    rng = random.Random(f"{seed}/{i}")
    cid = f"{cls}-{i:04d}"
    d = root / cid
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if cls in ONNX_CLASSES:
        command = COMMANDS[nth % len(COMMANDS)]
        variant, path, expect, extra = ONNX_CLASSES[cls](b, rng, d)
        if command == "search" and expect == "ok":
            expect = "refuse"  # search needs the torch model, never an ONNX file
        return Case(
            cid, cls, variant, command, command_args(command, str(path), d, rng, extra), str(path), expect
        )
    if cls in WEIGHTS_CLASSES:
        command = COMMANDS[nth % len(COMMANDS)]
        variant, path, expect, marker = WEIGHTS_CLASSES[cls](b, rng, d)
        if command == "search":
            args = _common_search(TINY_SPEC, f"npz:{_good_npz(b)}", d) + ["--weights", str(path)]
        else:
            args = command_args(command, TINY_SPEC, d, rng, ["--weights", str(path)])
        return Case(cid, cls, variant, command, args, str(path), expect, marker)
    variant, spec, expect, marker = DATA_CLASSES[cls](b, rng, d)
    return Case(cid, cls, variant, "search", _common_search(TINY_SPEC, spec, d), spec, expect, marker)


def _good_npz(b: Bases) -> Path:
    p = b.folder / "good.npz"
    if not p.is_file():
        np = b.np
        rng = np.random.default_rng(0)
        with open(p, "wb") as f:
            np.savez(f, x=rng.integers(0, 256, (100, 3, 16, 16), dtype=np.uint8), y=np.arange(100) % 5)
    return p


# ----------------------------------------------------------------------------------------------------------
# running a case and judging it


# what `search` prints on stderr while it works (its stage and trial lines): progress, not messages about the input
PROGRESS = ("• ", "  trial ")


def judge(case: Case, exit_code: int | None, stderr: str, stdout: str, problems: list[str]) -> list[str]:
    """What is wrong with an outcome (empty: clean).

    Exit 1 must come with exactly one "error:" line on stderr and nothing else there but search's progress
    lines (no warning before it, no second message). Exit 0 may come with warnings, never with an error line.
    Cases run with a wide terminal (COLUMNS), so one message is one line."""
    out = list(problems)
    if problems:
        return out
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in stderr + stdout:
        out.append("traceback")
    errors = [ln for ln in lines if ln.lstrip().lower().startswith(("error", "internal error"))]
    if exit_code not in (0, 1):
        out.append(f"exit code {exit_code}")
    elif exit_code == 1:
        others = [ln for ln in lines if ln not in errors and not ln.startswith(PROGRESS)]
        if any(ln.startswith("internal error:") for ln in errors):
            out.append("internal error (an unexpected exception)")
        elif len(errors) != 1:
            out.append(f"{len(errors)} error lines on stderr, not 1")
        elif others:
            out.append(
                f"{len(others)} line(s) on stderr besides the error (first: {others[0].strip()[:120]!r})"
            )
    elif errors:
        out.append("exit 0 with an error line on stderr")
    if case.expect == "ok" and exit_code != 0:
        out.append("expected exit 0 (a valid input)")
    if case.expect == "refuse" and exit_code == 0:
        out.append("expected a refusal (exit 1), got exit 0")
    if case.marker and os.path.exists(case.marker):
        out.append(f"the pickle's payload ran ({case.marker} was created)")
    return out


def _session_stats(sid: int) -> tuple[int, float]:
    """(largest resident set in KiB, CPU seconds used so far) over the processes of session `sid`; the CPU time
    counts the children they have reaped too."""
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    tick = os.sysconf("SC_CLK_TCK")
    rss, cpu = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != sid:
                continue
            cpu += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            rss = max(rss, int(fields[21]) * page_kb)
        except (OSError, ValueError, IndexError):
            continue
    return rss, cpu / tick


def _limits(as_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["COLUMNS"] = "1000"  # one message, one line (rich wraps at 80 columns when not on a terminal)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Limits:
    """When a case counts as hung or blown up. CPU time, not wall time, is the hang criterion: on a shared,
    busy machine a niced case may wait minutes for a core without being stuck; `wall` catches a case that is
    stuck without using CPU (a deadlock, a read that never returns)."""

    cpu: float = 60.0
    wall: float = 900.0
    rss_kb: int = 3072 * 1024

    def watch(self, sid: int, done: Callable[[float], bool]) -> tuple[list[str], int, float]:
        """Poll session `sid` until `done(poll seconds)` is true or a limit is passed (the session is then
        killed). Returns (problems, peak RSS KiB, CPU seconds used)."""
        t0 = time.perf_counter()
        _, cpu0 = _session_stats(sid)
        peak, used = 0, 0.0
        while not done(1.0):  # the answer ends the wait at once; /proc is read once a second (cheap)
            rss, cpu = _session_stats(sid)
            peak, used = max(peak, rss), max(used, cpu - cpu0)
            problem = None
            if rss > self.rss_kb:
                problem = (
                    f"memory: a process passed {self.rss_kb // 1024} MiB resident ({rss // 1024} MiB); killed"
                )
            elif used > self.cpu:
                problem = f"hang: {used:.0f} s of CPU without finishing; killed"
            elif time.perf_counter() - t0 > self.wall:
                problem = f"hang: no answer after {self.wall:.0f} s ({used:.0f} s of CPU); killed"
            if problem:
                _kill_group(sid)
                return [problem], peak, used
        rss, cpu = _session_stats(sid)
        return [], max(peak, rss), max(used, cpu - cpu0)


class SubprocessRunner:
    """Each case: `python -m onnxconet ARGS` in a new session, watched for CPU time, wall time and memory."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def run(self, case: Case, cwd: Path) -> tuple[int | None, str, str, float, list[str], int, float]:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "onnxconet", *case.args], cwd=cwd, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=_env(), start_new_session=True,
                preexec_fn=_limits(self.limits.rss_kb * 1024 + AS_SLACK),
            )  # fmt: skip
            status: dict = {}

            def done(wait: float) -> bool:
                end = time.perf_counter() + wait
                while True:
                    pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        status.update(code=os.waitstatus_to_exitcode(st), ru=ru)
                        return True
                    if time.perf_counter() >= end:
                        return False
                    time.sleep(0.05)

            problems, peak, cpu = self.limits.watch(proc.pid, done)
            if not status:
                _, st, ru = os.wait4(proc.pid, 0)
                status.update(code=None, ru=ru)
            proc.returncode = -1  # reaped above
            _kill_group(proc.pid)  # runner processes the CLI left behind
            ru = status["ru"]
            peak = max(peak, ru.ru_maxrss)
            cpu = max(cpu, ru.ru_utime + ru.ru_stime)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            return status["code"], stderr, stdout, time.perf_counter() - t0, problems, peak, cpu


class WorkerRunner:
    """One child process (`--worker`) runs the cases in-process through typer's CliRunner; restarted after a
    case that hangs, blows up or kills it."""

    def __init__(self, limits: Limits, cwd: Path) -> None:
        self.limits, self.cwd = limits, cwd
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=self.cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, env=_env(), start_new_session=True,
            preexec_fn=_limits(self.limits.rss_kb * 1024 + AS_SLACK),
        )  # fmt: skip
        self.starts += 1
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = self.proc.stdout.readline().decode() if sel.select(self.limits.wall) else ""
        info = json.loads(ready) if ready.startswith("{") else {}
        if info.get("ready") is not True:
            self.stop()
            raise SystemExit(f"the fuzz worker did not start: {ready!r}")
        if not info["onnxconet"].startswith(str(ROOT)):
            self.stop()
            raise SystemExit(f"the worker imports onnxconet from {info['onnxconet']}, not from {ROOT}")

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc.pid)
            self.proc.wait()
            self.proc = None

    def run(self, case: Case, cwd: Path):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.perf_counter()
        self.proc.stdin.write((json.dumps({"args": case.args, "cwd": str(cwd)}) + "\n").encode())
        self.proc.stdin.flush()
        answer: list[str] = []
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)

            def done(wait: float) -> bool:
                if sel.select(wait):
                    answer.append(self.proc.stdout.readline().decode())
                    return True
                return False

            problems, peak, cpu = self.limits.watch(self.proc.pid, done)
        seconds = time.perf_counter() - t0
        if problems:
            self.stop()
            return None, "", "", seconds, problems, peak, cpu
        if not answer[0]:
            code = self.proc.wait()
            self.stop()
            return code, "", "", seconds, [f"the process died (exit code {code})"], peak, cpu
        r = json.loads(answer[0])
        self._reap_strays()
        return r["exit_code"], r["stderr"], r["stdout"], seconds, [], max(peak, r["peak_kb"]), cpu

    def _reap_strays(self) -> None:
        """Runner processes a failed command left in the worker's session would skew later cases: kill them."""
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == self.proc.pid:
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[3]) == self.proc.pid and fields[0] != "Z":
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue


def worker_main() -> None:
    """The child of --mode worker: read {"args", "cwd"} lines, run each through the typer app, answer a line."""
    import traceback

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing but answers on the protocol pipe
    from typer.testing import CliRunner

    import onnxconet
    from onnxconet.cli import app

    runner = CliRunner()
    proto.write(json.dumps({"ready": True, "onnxconet": onnxconet.__file__}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        os.chdir(req["cwd"])
        with tempfile.TemporaryFile() as fd_out, tempfile.TemporaryFile() as fd_err:
            saved = os.dup(1), os.dup(2)
            os.dup2(fd_out.fileno(), 1)
            os.dup2(fd_err.fileno(), 2)
            try:
                with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM)
                    f.write("5")
            except OSError:
                pass
            try:
                r = runner.invoke(app, req["args"], catch_exceptions=True)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
            fd_out.seek(0), fd_err.seek(0)
            c_out, c_err = fd_out.read().decode(errors="replace"), fd_err.read().decode(errors="replace")
        stderr = r.stderr + c_err
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            # the real entry point would print this traceback
            stderr += "".join(traceback.format_exception(*r.exc_info))
        hwm = 0
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    hwm = int(ln.split()[1])
        proto.write(
            json.dumps(
                {
                    "exit_code": r.exit_code,
                    "stderr": stderr,
                    "stdout": (r.stdout + c_out)[-2000:],
                    "peak_kb": hwm,
                }
            )
            + "\n"
        )


# ----------------------------------------------------------------------------------------------------------
# main


def plan(n: int, classes: list[str]) -> list[tuple[int, str, int]]:
    """(case index, class, nth of its class): classes take turns, so each gets n / len(classes) cases."""
    counts = dict.fromkeys(classes, 0)
    out = []
    for i in range(n):
        cls = classes[i % len(classes)]
        out.append((i, cls, counts[cls]))
        counts[cls] += 1
    return out


def summarize(outcomes: list[Outcome], seconds: float, mode: str, seed: int, argv: list[str]) -> str:
    lines = [f"fuzz_inputs: {len(outcomes)} cases, seed {seed}, mode {mode}, {seconds:.0f} s"]
    lines.append(f"{'class':18} {'cases':>6} {'clean':>6}  commands")
    by_cls: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_cls.setdefault(o.cls, []).append(o)
    for cls in [c for c in CLASSES if c in by_cls]:
        os_ = by_cls[cls]
        cmds = sorted({o.command for o in os_})
        clean = sum(o.clean for o in os_)
        lines.append(f"{cls:18} {len(os_):>6} {clean:>6}  {','.join(cmds)}")
    total_clean = sum(o.clean for o in outcomes)
    lines.append(
        f"{'total':18} {len(outcomes):>6} {total_clean:>6}  ({100 * total_clean / max(len(outcomes), 1):.1f} % clean)"
    )
    exits = {}
    for o in outcomes:
        exits[o.exit_code] = exits.get(o.exit_code, 0) + 1
    peak = max((o.peak_rss_mb for o in outcomes), default=0)
    slow = max(outcomes, key=lambda o: o.cpu_seconds, default=None)
    cpu = sum(o.cpu_seconds for o in outcomes)
    lines.append(
        f"exit codes {dict(sorted(exits.items(), key=lambda kv: str(kv[0])))}; largest peak RSS of a case "
        f"{peak:.0f} MiB; CPU {cpu:.0f} s in all"
        + (f", most {slow.cpu_seconds:.1f} s ({slow.id}, {slow.seconds:.1f} s wall)" if slow else "")
    )
    failing = [o for o in outcomes if not o.clean]
    if failing:
        lines.append("")
        lines.append(f"failing cases ({len(failing)}):")
        for o in failing:
            lines = [ln.strip() for ln in o.stderr.splitlines() if ln.strip()]
            first = next((ln for ln in lines if not ln.startswith(PROGRESS)), lines[0] if lines else "")
            lines.append(f"  {o.id} [{o.command}] {o.variant}")
            lines.append(f"      problem: {'; '.join(o.problems)}")
            lines.append(f"      input:   {o.input}")
            if first:
                lines.append(f"      stderr:  {first[:300]}")
        lines.append("")
        lines.append(
            "rerun the failing cases: " + " ".join(argv + ["--only", ",".join(o.id for o in failing)])
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tools/fuzz_inputs.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cases", type=int, default=320, help="number of cases (default 320)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    ap.add_argument("--out", type=Path, default=Path("out/fuzz"), help="work folder (default out/fuzz)")
    ap.add_argument("--mode", choices=["worker", "subprocess"], default="worker",
                    help="worker: cases in-process in one child (fast); subprocess: python -m onnxconet per case")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="CPU seconds a case may use, its processes together (default 60)")  # fmt: skip
    ap.add_argument("--wall-timeout", type=float, default=900.0,
                    help="wall seconds a case may take, for hangs that use no CPU (default 900)")  # fmt: skip
    ap.add_argument(
        "--rss-mb", type=int, default=3072, help="peak resident MiB of any process of a case (3072)"
    )
    ap.add_argument("--classes", default=None, help=f"comma-separated subset of: {', '.join(CLASSES)}")
    ap.add_argument("--only", default=None, help="comma-separated case ids to run (e.g. onnx-dims-0004)")
    ap.add_argument(
        "--dry-run", action="store_true", help="write the cases' inputs and list them; run nothing"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    classes = args.classes.split(",") if args.classes else list(CLASSES)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        ap.error(f"unknown classes {unknown}; choose from {CLASSES}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases_dir = out / "cases"
    t_start = time.perf_counter()
    bases = Bases(out / "base")
    todo = plan(args.cases, classes)
    if args.only:
        wanted = set(args.only.split(","))
        todo = [t for t in todo if f"{t[1]}-{t[0]:04d}" in wanted]
        missing = wanted - {f"{t[1]}-{t[0]:04d}" for t in todo}
        if missing:
            ap.error(f"cases {sorted(missing)} are not among --cases {args.cases} of --classes {classes}")
    limits = Limits(cpu=args.timeout, wall=args.wall_timeout, rss_kb=args.rss_mb * 1024)
    runner = WorkerRunner(limits, out) if args.mode == "worker" else SubprocessRunner(limits)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the worker is stopped too
    outcomes: list[Outcome] = []
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(bases.folder.glob("*")))).hexdigest()[:12]
    print(f"bases in {bases.folder} (sha256 {digest}); {len(todo)} cases, mode {args.mode}", flush=True)
    if args.dry_run:
        for i, cls, nth in todo:
            case = make_case(bases, args.seed, i, cls, nth, cases_dir)
            print(f"{case.id:22} {case.command:8} {case.expect:6} {case.variant}")
        return 0
    results = (out / "results.jsonl").open("w")
    try:
        for i, cls, nth in todo:
            case = make_case(bases, args.seed, i, cls, nth, cases_dir)
            code, stderr, stdout, seconds, problems, peak, cpu = runner.run(case, cases_dir / case.id)
            o = Outcome(
                case.id, cls, case.command, case.variant, case.input, case.args, code, round(seconds, 2),
                round(cpu, 2), round(peak / 1024, 1), stderr, stdout[-500:],
                judge(case, code, stderr, stdout, problems),
            )  # fmt: skip
            outcomes.append(o)
            results.write(json.dumps(asdict(o)) + "\n")
            results.flush()
            mark = "ok  " if o.clean else "FAIL"
            print(f"{mark} {o.id:22} {o.command:8} exit {o.exit_code} {o.seconds:5.1f}s {o.cpu_seconds:5.1f}s cpu  "
                  f"{o.variant[:70]}"
                  + ("" if o.clean else f"  -> {'; '.join(o.problems)}"), flush=True)  # fmt: skip
    finally:
        results.close()
        if isinstance(runner, WorkerRunner):
            runner.stop()
    seconds = time.perf_counter() - t_start
    rerun = ["nice", "-n", "19", "python", "tools/fuzz_inputs.py", "--cases", str(args.cases), "--seed",
             str(args.seed), "--out", str(args.out), "--mode", args.mode, "--timeout", str(args.timeout), "--wall-timeout", str(args.wall_timeout),
             "--rss-mb", str(args.rss_mb)]  # fmt: skip
    if args.classes:
        rerun += ["--classes", args.classes]
    text = summarize(outcomes, seconds, args.mode, args.seed, rerun)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    text += f"\nlargest child process (getrusage RUSAGE_CHILDREN): {children:.0f} MiB"
    if isinstance(runner, WorkerRunner):
        text += f"; worker started {runner.starts} time(s)"
    print("\n" + text)
    (out / "summary.txt").write_text(text + "\n")
    return 0 if all(o.clean for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
