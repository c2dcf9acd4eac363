"""The architecture holds: imports go one way and never in a circle (import-linter's contracts in
pyproject.toml), and functions stay small (docs/architecture.md)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxconet"
MAX_PARAMS, MAX_LINES = 8, 80
# typer commands take their options as parameters: the CLI layer parses and prints, nothing else
EXEMPT = {("cli/profile.py", "profile"), ("cli/search.py", "search")}


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not found: pip install -e '.[test]' installs import-linter")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def oversized(source: str, rel: str) -> list[str]:
    """The functions of `source` with more than MAX_PARAMS parameters (self/cls not counted) or MAX_LINES lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            n -= bool(a.args and a.args[0].arg in ("self", "cls"))
            lines = node.end_lineno - node.lineno + 1
            if (n > MAX_PARAMS or lines > MAX_LINES) and (rel, node.name) not in EXEMPT:
                found.append(f"{rel}:{node.lineno} {node.name}: {n} parameters, {lines} lines")
    return found


def test_functions_are_small():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        too_big += oversized(path.read_text(), path.relative_to(PACKAGE).as_posix())
    assert not too_big, "\n".join(too_big)


def test_the_size_check_flags_what_it_should():
    nine = "def f(a, b, c, d, e, f, g, h, i):\n    return a\n"
    method = "class C:\n    def m(self, a, b, c, d, e, f, g, h):\n        return a\n"  # self not counted
    long = "def g():\n" + "    x = 1\n" * 80
    assert [x.split(":")[1].split()[1] for x in oversized(nine + long, "m.py")] == ["f", "g"]
    assert oversized(method, "m.py") == []
    assert (
        oversized("def search(" + ", ".join(f"a{i}" for i in range(20)) + "): pass\n", "cli/search.py") == []
    )
