"""Times one ONNX model with onnxruntime the way a deployment runs it: the device side of every measurement.

Standalone on purpose: it imports only the standard library, numpy and onnxruntime, so this one file can be
copied to an edge device and run there. The workstation side (`onnxconet.latency.profile`) starts it as a
subprocess and speaks JSON lines with it.

    python runner.py time MODEL [--threads T] [--provider cpu] [--max-seconds S] [--config KEY=VALUE ...]
        MODEL alone in this fresh process: one session with onnxruntime's default options (plus those given),
        warm-up, timed runs back to back until the median is stable; prints one JSON object.
    python runner.py serve
        one request per line on stdin, one answer per line on stdout:
        {"op": "load", "model": PATH, "provider", "threads", "batch", "input_shape", "strict", "spin", "config"}
        {"op": "time", "seconds": 0.1, "warmup_seconds": 0.01, "min_runs": 3}       one burst of runs
        {"op": "measure", "warmup": 10, "min_runs": 20, "max_runs": 2000, "max_seconds": 5, "rel_ci": 0.02}
        {"op": "identity"}                                                           what this device is
        {"op": "unload"} / {"op": "quit"}
        every answer is {"ok": true, ..., "cpu_s": this process's CPU seconds so far} or
        {"ok": false, "error": "one line"}; the loop ends at end of input.

Session options are onnxruntime's defaults — intra-op threads spin between runs, the thread count is
onnxruntime's own choice (its physical cores) unless `threads` is given — because that is what a user's
`InferenceSession(path)` gets. Only the log level is changed (errors only).

Stopping rule of `measure`: after warm-up, runs are timed until the 95% confidence interval of the median is
narrower than ``rel_ci`` times the median (half-width), or until ``max_runs`` / ``max_seconds``. The interval is
the distribution-free order-statistic one (Conover, *Practical Nonparametric Statistics*): with n sorted
samples x(1) <= ... <= x(n), the number of samples below the true median is Binomial(n, 1/2), so [x(j), x(k)]
with j = floor((n - 1.96 sqrt(n)) / 2) and k = ceil(1 + (n + 1.96 sqrt(n)) / 2) covers the median with ~95%
probability whatever the distribution of run times (they are skewed and heavy-tailed).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import logging
import math
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, TRT)
ASKED = {"cpu": CPU, "cuda": CUDA, "tensorrt": TRT}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_Z95 = 1.96
PROTOCOL = 1


class RunnerError(Exception):
    """A model cannot be loaded or run here; the message is one line and names the model."""


# ------------------------------------------------------------------------------------------------ the device
@functools.cache
def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (falls back to the logical count)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        topo = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(topo + "physical_package_id") as f1, open(topo + "core_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def identity() -> dict:
    """What this device is: the facts a latency depends on (a cache keys on them, a report states them)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "system": platform.system(),
        "logical_cpus": logical,
        "physical_cores": physical_cores(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "python": platform.python_version(),
        "protocol": PROTOCOL,
    }


def cpu_seconds() -> float:
    """CPU time this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------------------ sessions
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _nvidia_driver_reason() -> str | None:
    """Why no GPU provider can load (no NVIDIA driver library), or None when the driver loads."""
    lib = {"Linux": "libcuda.so.1", "Windows": "nvcuda.dll"}.get(platform.system())
    if lib is None:
        return f"no CUDA on {platform.system()}"
    try:
        ctypes.CDLL(lib)
    except OSError:
        return f"NVIDIA driver library {lib} not found"
    return None


@functools.cache  # once per process
def _preload_nvidia_libs() -> None:
    # onnxruntime-gpu can load the CUDA/cuDNN libraries that a CUDA build of torch installed.
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # best effort; the session tells what really loads
            log.debug("onnxruntime.preload_dlls failed: %s", _first_line(e))


def _provider_chain(provider: str, trt_cache_dir: str | None) -> list[tuple[str, dict]]:
    if provider == "cpu":
        return [(CPU, {})]
    chain: list[tuple[str, dict]] = []
    if provider in ("auto", "tensorrt"):
        cache_dir = trt_cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "onnxconet", "trt"
        )
        opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir}
        opts |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": cache_dir}
        chain.append((TRT, opts))
    chain.append((CUDA, {"device_id": 0}))
    return chain + [(CPU, {})]


def session_options(threads: int = 0, spin: bool = True, config: dict | None = None) -> ort.SessionOptions:
    """onnxruntime's default options, plus `threads` intra-op threads when > 0, spinning off when `spin` is
    False, and the session config entries in `config` (e.g. {"session.intra_op.allow_spinning": "0"})."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: "nodes not assigned to the preferred EP" is expected
    if threads > 0:
        so.intra_op_num_threads = threads
    if not spin:  # idle intra-op threads block instead of busy-waiting
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def make_session(
    source: str | bytes, opts: Mapping | None = None, label: str | None = None
) -> tuple[ort.InferenceSession, str | None]:
    """An onnxruntime session on the best provider asked for that really loads.

    Args:
        source: a model path (opened from the path, so external data next to it works) or ONNX bytes.
        opts: the `load` request's session fields: "provider" ("auto": TensorRT, else CUDA, else CPU,
            whichever loads; "cpu", "cuda" or "tensorrt"), "threads" (intra-op threads; 0 leaves
            onnxruntime's default, its physical cores), "strict" (raise when the asked provider does not load
            instead of falling back), "spin" and "config" (see `session_options`), "trt_cache_dir" (TensorRT
            engine cache folder, default ~/.cache/onnxconet/trt).
        label: how error messages name the model (default: the path, or "<bytes>").

    Returns:
        The session and a one-line note when the asked provider could not load (else None; "auto" never
        notes, it logs what it chose).

    Raises:
        RunnerError: the model cannot be loaded, or strict and the asked provider did not load.
    """
    opts = opts or {}
    provider, strict = opts.get("provider", "auto"), bool(opts.get("strict", False))
    label = label or (source if isinstance(source, str) else "<bytes>")
    if provider not in ("auto", *ASKED):
        raise RunnerError(f"unknown provider {provider!r}; use auto, cpu, cuda or tensorrt")
    if isinstance(source, str) and not os.path.isfile(source):
        raise RunnerError(f"model file {label} not found")
    chain = _provider_chain(provider, opts.get("trt_cache_dir"))
    reasons: list[str] = []
    if len(chain) > 1:
        available = set(ort.get_available_providers())
        missing = [p for p, _ in chain if p not in available]
        reasons += [f"{p}: not in this onnxruntime build" for p in missing]
        chain = [(p, o) for p, o in chain if p not in missing]
    if len(chain) > 1:
        no_driver = _nvidia_driver_reason()
        if no_driver:  # skip the GPU attempts: they would fail after noisy logs
            reasons.append(f"{chain[0][0]}: {no_driver}")
            chain = [(CPU, {})]
        else:
            _preload_nvidia_libs()
    if chain[0][0] == TRT:
        os.makedirs(chain[0][1]["trt_engine_cache_path"], exist_ok=True)
    so = session_options(int(opts.get("threads", 0)), bool(opts.get("spin", True)), opts.get("config"))
    while True:
        try:
            session = ort.InferenceSession(source, sess_options=so, providers=chain, enable_fallback=0)
            break
        except Exception as e:  # onnxruntime raises its own pybind classes, not RuntimeError
            if len(chain) == 1:
                raise RunnerError(f"onnxruntime cannot load model {label}: {_first_line(e)}") from e
            reasons.append(f"{chain[0][0]}: {_first_line(e)}")
            chain = chain[1:]
    used = session.get_providers()[0]
    wanted = ASKED.get(provider)
    for p, _ in chain:  # providers before the one used loaded silently-not (onnxruntime logs why)
        if p == used:
            break
        reasons.append(f"{p}: did not load (see onnxruntime's log for the missing library)")
    why = "; ".join(reasons) or "unknown reason"
    if provider == "auto":
        log.info("latency target auto -> %s%s", used, f" ({why})" if used == CPU and reasons else "")
        return session, None
    if used == wanted:
        return session, None
    if strict:
        raise RunnerError(f"provider {provider} ({wanted}) did not load, {used} did ({why}); drop strict")
    return session, f"asked for {provider} ({wanted}) but measuring on {used}: {why}"


def _input_shape(dims: list, batch: int, input_shape, name: str, label: str) -> tuple[int, ...]:
    """Concrete input shape: the model's dims (or `input_shape`) with the batch of the target."""
    first = dims[0] if dims else None
    if isinstance(first, int) and first > 0 and first != batch:
        raise RunnerError(
            f"model {label} was exported with batch {first} but the target batch is {batch};"
            f" export/slice it with batch {batch}"
        )
    if input_shape is not None:
        shape = (batch, *[int(d) for d in input_shape[1:]])
        bad = len(shape) != len(dims) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(dims[1:], shape[1:], strict=True)
        )
        if bad:
            raise RunnerError(
                f"target input_shape {tuple(input_shape)} does not fit input {name!r} {dims} of {label}"
            )
        return shape
    symbolic = [d for d in dims[1:] if not (isinstance(d, int) and d > 0)]
    if symbolic:
        raise RunnerError(f"input {name!r} of {label} has symbolic dims {dims}; set the target's input_shape")
    return (batch, *dims[1:])


class TimedSession:
    """One session and its input, timed one inference at a time.

    On CUDA/TensorRT the input lives on the device and outputs are bound there (IOBinding), so host-device
    copies are not timed.
    """

    def __init__(
        self, source: str | bytes, opts: Mapping | None = None, *, label: str | None = None, seed: int = 0
    ) -> None:
        """`opts`: the `load` request's fields (`make_session`'s, plus "batch" and "input_shape": the input
        timed, its batch entry replaced by batch; None reads the shape from the model)."""
        opts = opts or {}
        label = label or (source if isinstance(source, str) else "<bytes>")
        t0 = time.perf_counter()
        self.session, self.fallback = make_session(source, opts, label)
        self.session_seconds = time.perf_counter() - t0
        self.provider: str = self.session.get_providers()[0]
        self.threads = int(opts.get("threads", 0)) or physical_cores()
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise RunnerError(f"model {label} has {len(inputs)} inputs; latency needs exactly one")
        inp = inputs[0]
        if inp.type not in _DTYPES:
            raise RunnerError(f"input {inp.name!r} of {label} has type {inp.type}; need a float tensor")
        self.input_shape = _input_shape(
            list(inp.shape), int(opts.get("batch", 1)), opts.get("input_shape"), inp.name, label
        )
        x = np.random.default_rng(seed).standard_normal(self.input_shape).astype(_DTYPES[inp.type])
        self._feed = {inp.name: x}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._binding = None
        if self.provider in GPU_PROVIDERS:
            self._binding = self.session.io_binding()
            self._x_device = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)  # kept alive while bound
            self._binding.bind_ortvalue_input(inp.name, self._x_device)
            for name in self._outputs:
                self._binding.bind_output(name, "cuda", 0)
        try:
            self.run_once()  # a model that loads but cannot run fails here, named, not inside a timing loop
        except Exception as e:
            raise RunnerError(f"onnxruntime cannot run model {label}: {_first_line(e)}") from e

    def run_once(self) -> float:
        """Run one inference; return its duration in seconds."""
        if self._binding is not None:
            t0 = time.perf_counter()
            self.session.run_with_iobinding(self._binding)
            self._binding.synchronize_outputs()
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        self.session.run(self._outputs, self._feed)
        return time.perf_counter() - t0

    def describe(self) -> dict:
        return {
            "provider": self.provider,
            "fallback": self.fallback,
            "threads": self.threads,
            "input_shape": list(self.input_shape),
            "session_seconds": self.session_seconds,
            "onnxruntime": ort.__version__,
        }


# ------------------------------------------------------------------------------------------------ timing
def median_ci(samples) -> tuple[float, float, float]:
    """Median and its distribution-free 95% confidence interval (lo, hi); see the module docstring."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    med = float(np.median(x)) if n else math.nan
    if n < 6:  # too few samples for any 95% order-statistic interval
        return med, float(x[0]) if n else math.nan, float(x[-1]) if n else math.nan
    half = _Z95 * math.sqrt(n) / 2
    j = max(1, math.floor(n / 2 - half))  # 1-based ranks
    k = min(n, math.ceil(1 + n / 2 + half))
    return med, float(x[j - 1]), float(x[k - 1])


def stable(samples, rel_ci: float) -> bool:
    """Whether the 95% CI half-width of the median of `samples` is below `rel_ci` times the median."""
    if len(samples) < 6:
        return False
    med, lo, hi = median_ci(samples)
    return (hi - lo) / 2 < rel_ci * abs(med)


def until_stable(step: Callable[[int], float], warm: Callable[[], object], budget: tuple) -> list[float]:
    """Warm up, then call step(i) (which returns the sample to judge) until the median is stable.

    `budget` = (warmup, min_n, max_n, max_seconds, rel_ci). `max_seconds` bounds warm-up plus timed runs
    (warm-up gets at most a fifth of it, and at least one run); it is checked between runs, so the overshoot is
    one run. `min_n` yields to `max_seconds`.
    """
    warmup, min_n, max_n, max_seconds, rel_ci = budget
    start = time.perf_counter()
    for i in range(max(1, warmup)):
        warm()
        if i + 1 < warmup and time.perf_counter() - start > max_seconds / 5:
            break
    deadline = start + max_seconds
    samples: list[float] = []
    next_check = max(min_n, 6)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be timed (timeit does the same)
    try:
        while len(samples) < max_n:
            samples.append(step(len(samples)))
            if time.perf_counter() >= deadline:
                break
            if len(samples) >= next_check:  # every ~5%: a sort per run costs more than a tiny model
                if stable(samples, rel_ci):
                    break
                next_check = len(samples) + max(1, len(samples) // 20)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def burst(ts: TimedSession, seconds: float, warmup_seconds: float = 0.01, min_runs: int = 3) -> list[float]:
    """Runs back to back for about `seconds`: the first `warmup_seconds` (at least one run) untimed, since a
    session that sat idle pays for waking its threads; then at least `min_runs` timed runs. Seconds each."""
    start = time.perf_counter()
    ts.run_once()
    while time.perf_counter() - start < warmup_seconds:
        ts.run_once()
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - t0 < seconds:
            times.append(ts.run_once())
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


# ------------------------------------------------------------------------------------------------ protocol
class Server:
    """The `serve` loop's state: at most one loaded model."""

    def __init__(self) -> None:
        self.ts: TimedSession | None = None

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "identity":
            return identity()
        if op == "load":
            self.ts = None  # the previous session's threads go before the next one's start
            gc.collect()
            self.ts = TimedSession(req["model"], req, label=req.get("label"))
            return self.ts.describe()
        if op == "unload":
            self.ts = None
            gc.collect()
            return {}
        if op in ("time", "measure") and self.ts is None:
            raise RunnerError(f"{op}: no model loaded; send a load request first")
        if op == "time":
            times = burst(
                self.ts, float(req.get("seconds", 0.1)), float(req.get("warmup_seconds", 0.01)),
                int(req.get("min_runs", 3)),
            )  # fmt: skip
            return {"times_ms": [t * 1e3 for t in times]}
        if op == "measure":
            ts = self.ts
            budget = (
                int(req.get("warmup", 10)), int(req.get("min_runs", 20)), int(req.get("max_runs", 2000)),
                float(req.get("max_seconds", 5.0)), float(req.get("rel_ci", 0.02)),
            )  # fmt: skip
            times = until_stable(lambda _i: ts.run_once(), ts.run_once, budget)
            return {"times_ms": [t * 1e3 for t in times]}
        raise RunnerError(f"unknown request op {op!r}")


def serve(stdin=None, stdout=None) -> int:
    """Answer JSON-line requests until end of input or {"op": "quit"}."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    server = Server()
    for line in stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise RunnerError("a request must be a JSON object")
            if req.get("op") == "quit":
                break
            answer = {"ok": True, **server.handle(req)}
        except Exception as e:  # noqa: BLE001 - every failure is an answer, the loop goes on
            answer = {"ok": False, "error": _first_line(e), "kind": type(e).__name__}
        answer["cpu_s"] = cpu_seconds()
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()
    return 0


def _config_pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--config {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="answer JSON-line requests on stdin/stdout")
    sub.add_parser("identity", help="print what this device is")
    t = sub.add_parser("time", help="time one model alone in this process; print one JSON object")
    t.add_argument("model")
    t.add_argument("--provider", default="auto")
    t.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--input-shape", default=None, help="N,C,H,W for symbolic inputs")
    t.add_argument("--strict", action="store_true")
    t.add_argument("--no-spin", action="store_true", help="session.intra_op.allow_spinning=0")
    t.add_argument("--config", action="append", default=[], help="session config entry KEY=VALUE")
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--min-runs", type=int, default=20)
    t.add_argument("--max-runs", type=int, default=2000)
    t.add_argument("--max-seconds", type=float, default=5.0)
    t.add_argument("--rel-ci", type=float, default=0.02)
    t.add_argument("--label", default=None)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        # a Ctrl-C in the terminal reaches the whole process group: the search that owns this runner stops it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return serve()
    if args.cmd == "identity":
        print(json.dumps(identity()))
        return 0
    req = {
        "op": "load", "model": args.model, "provider": args.provider, "threads": args.threads,
        "batch": args.batch, "strict": args.strict, "spin": not args.no_spin,
        "config": _config_pairs(args.config), "label": args.label,
        "input_shape": [int(d) for d in args.input_shape.split(",")] if args.input_shape else None,
    }  # fmt: skip
    server = Server()
    try:
        loaded = server.handle(req)
        timed = server.handle(
            {"op": "measure", "warmup": args.warmup, "min_runs": args.min_runs, "max_runs": args.max_runs,
             "max_seconds": args.max_seconds, "rel_ci": args.rel_ci}
        )  # fmt: skip
        answer = {"ok": True, **loaded, **timed}
    except Exception as e:  # noqa: BLE001
        answer = {"ok": False, "error": _first_line(e), "kind": type(e).__name__}
    answer["cpu_s"] = cpu_seconds()
    print(json.dumps(answer))
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
