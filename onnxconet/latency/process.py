"""The workstation side of `runner.py`: runner subprocesses, models handed to them as files, and a watch on the
CPU time other programs take while we measure.

A latency as deployed is one model alone in its own process with onnxruntime's defaults, so every measurement
runs in `runner.py` subprocesses, never in this (torch) process: none of this process's threads, allocators or
imports can touch the timing.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from onnxconet.errors import LatencyError

log = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _env() -> dict:
    """The child's environment: ours, with this package importable however we were started."""
    env = dict(os.environ)
    paths = [_PACKAGE_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class RunnerProcess:
    """A `runner.py serve` subprocess (see its docstring for the requests).

    Answers come back within `timeout` seconds or the process is killed and `LatencyError` raised; a request
    the runner refuses raises `LatencyError` with its one-line reason. `cpu_s` is the runner's CPU time as of
    its last answer.
    """

    def __init__(
        self,
        python: str | None = None,
        timeout: float = 600.0,
        *,
        argv: list[str] | None = None,
        explain=None,
        new_session: bool = False,
        name: str = "",
    ) -> None:
        """`argv` starts the runner another way (e.g. `ssh host python3 runner.py serve`, `device.py`);
        `explain(stderr_tail)` turns the runner's last stderr line into the message a failure raises;
        `new_session` keeps a terminal's Ctrl-C from the child (an ssh client would drop the connection: the
        search that owns it stops it); `name` (a device's URL) starts every error message."""
        self.timeout = timeout
        self._prefix = f"{name}: " if name else ""
        self._explain = explain
        self._stderr = tempfile.TemporaryFile()
        argv = argv or [python or sys.executable, "-m", "onnxconet.latency.runner", "serve"]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=_env(),
                text=True,
                bufsize=1,
                start_new_session=new_session,
            )
        except OSError as e:
            raise LatencyError(f"cannot start the latency runner ({argv[0]}): {e}") from e
        self.cpu_s = 0.0
        self.started = time.perf_counter()

    def request(self, op: str, timeout: float | None = None, **fields) -> dict:
        """Send one request, return the runner's answer (a dict with "ok": True)."""
        if self.proc.poll() is not None:
            raise LatencyError(
                f"the latency runner exited (code {self.proc.returncode}){self._stderr_tail()}"
            )
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise LatencyError(f"the latency runner is gone ({e}){self._stderr_tail()}") from e
        line = self._readline(self.timeout if timeout is None else timeout, op)
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise LatencyError(f"the latency runner answered {line[:120]!r} to {op}") from None
        self.cpu_s = float(answer.get("cpu_s", self.cpu_s))
        if not answer.get("ok"):
            raise LatencyError(self._prefix + (answer.get("error") or f"the latency runner refused {op}"))
        return answer

    def _readline(self, timeout: float, op: str) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.kill()
                raise LatencyError(
                    f"the latency runner did not answer {op} within {timeout:.0f} s; killed it"
                )
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=5)
            oom = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise LatencyError(
                f"{self._prefix}the latency runner died during {op} (exit code {code}){oom}{self._stderr_tail()}"
            )
        return line

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        last = text.splitlines()[-1][:300] if text else ""
        if self._explain is not None:
            return self._explain(last)
        return f": {last}" if last else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Ask the runner to quit (it also quits at end of input), kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.kill()
        for f in (self.proc.stdout, self._stderr):
            try:
                f.close()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> RunnerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten runner must not outlive its owner
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def label_of(model) -> str:
    """How messages name a model: its path, or "<bytes>"."""
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<bytes>"


@contextmanager
def model_file(model, folder: str | None = None):
    """A path the runner can open for `model` (a path stays itself; bytes and protos go to a temp file that is
    removed afterwards)."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise LatencyError(f"model file {path} not found")
        yield path
        return
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= _PROTO_LIMIT:
            raise LatencyError("model is > 2 GB; save it with external data and pass the file path")
        data = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    else:
        raise LatencyError(f"cannot time a {type(model).__name__}; pass ONNX bytes, a path or a ModelProto")
    fd, path = tempfile.mkstemp(prefix="onnxconet-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def onnx_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph that may hold external data: initializers, attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from onnx_tensors(attr.g)
            for g in attr.graphs:
                yield from onnx_tensors(g)


# ------------------------------------------------------------------------------------------------ load watch
def _busy_cpu_seconds() -> float | None:
    """CPU seconds all CPUs have spent busy since boot, hypervisor steal included (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadWatch:
    """CPU time that other programs took while we measured, in CPUs (0.0 = the machine was ours).

    Busy time of all CPUs (/proc/stat) minus this process's and our runners' CPU time over the same window.
    `add_runner(before, after)` books a runner's CPU seconds; a fresh runner books from 0.
    """

    def __init__(self, active: bool = True) -> None:
        """`active` False: the runners are on another machine, whose load this one cannot see."""
        self.active = active
        self.t0 = time.perf_counter()
        self.busy0 = _busy_cpu_seconds()
        self.own0 = _own_cpu_seconds()
        self.runners = 0.0

    def add_runner(self, before: float, after: float) -> None:
        self.runners += max(0.0, after - before)

    def load(self) -> float | None:
        busy = _busy_cpu_seconds()
        wall = time.perf_counter() - self.t0
        if not self.active or busy is None or self.busy0 is None or wall <= 0:
            return None
        ours = (_own_cpu_seconds() - self.own0) + self.runners
        return max(0.0, (busy - self.busy0 - ours) / wall)


def logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def disturbed(load: float | None, threads: int) -> bool:
    """Whether other programs took cores the measured session needed: more than a quarter of a CPU, and more
    than the CPUs left over by `threads` intra-op threads. Measured on the 2-core CI kind: one busy process
    beside a 1-thread session changes no ratio (within 2 %); beside a 2-thread session, as-deployed ratios moved
    from 0.35 to 0.14 (mobilenet_v2) and from 0.26 to 0.38 (resnet18)."""
    return load is not None and load > 0.25 and load + threads > logical_cpus() + 0.1
