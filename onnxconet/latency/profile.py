"""Latency of an ONNX model measured with onnxruntime, like a benchmark.

Reading order: `Target` (where and how to run) -> `make_session` (a session on the provider that
really loads) -> `Runner` (one session + its input, timed one inference at a time) -> `measure`
(absolute latency) and `measure_relative` (candidate / reference ratio measured interleaved, which
is what a noisy machine can compare reliably).

Stopping rule (both `measure` and `measure_relative`): after warm-up, runs are timed until the 95%
confidence interval of the median is narrower than ``rel_ci`` times the median (half-width), or until
``max_runs`` / ``max_seconds`` is reached. The interval is the distribution-free order-statistic one
(Conover, *Practical Nonparametric Statistics*): with n sorted samples x(1) <= ... <= x(n), the number
of samples below the true median is Binomial(n, 1/2), so [x(j), x(k)] with
j = floor((n - 1.96 sqrt(n)) / 2) and k = ceil(1 + (n + 1.96 sqrt(n)) / 2) covers the median with ~95%
probability whatever the distribution of run times (they are skewed and heavy-tailed).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxconet.errors import LatencyError

log = logging.getLogger(__name__)

ModelLike = bytes | str | os.PathLike | onnx.ModelProto

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_GPU_PROVIDERS = (CUDA, TRT)
_ASKED = {"cpu": CPU, "cuda": CUDA, "tensorrt": TRT}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_Z95 = 1.96


@dataclass(frozen=True)
class Target:
    """Where and how a model is timed.

    Attributes:
        provider: "auto" (TensorRT, else CUDA, else CPU: whichever really loads), "cpu", "cuda"
            or "tensorrt".
        threads: intra-op threads; 0 means the number of physical cores this process may use.
        batch: batch size of the timed input.
        input_shape: (N, C, H, W) of the input; None reads it from the model. Its batch entry is
            always replaced by `batch`.
        strict: raise LatencyError when the asked provider does not load instead of falling back.
        trt_cache_dir: TensorRT engine cache folder (default: ~/.cache/onnxconet/trt).
    """

    provider: str = "auto"
    threads: int = 0
    batch: int = 1
    input_shape: tuple[int, ...] | None = None
    strict: bool = False
    trt_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.provider not in ("auto", *_ASKED):
            raise LatencyError(f"unknown provider {self.provider!r}; use auto, cpu, cuda or tensorrt")
        if self.threads < 0 or self.batch < 1:
            raise LatencyError(
                f"bad target threads={self.threads} batch={self.batch}; need threads>=0, batch>=1"
            )
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    @property
    def resolved_threads(self) -> int:
        """Intra-op thread count really used (`threads`, or the physical core count when 0)."""
        return self.threads or physical_cores()


@dataclass
class LatencyStats:
    """Summary of timed runs of one model (times in milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    provider: str
    requested: str
    fallback: str | None
    threads: int
    batch: int
    input_shape: tuple[int, ...]
    onnxruntime: str

    def to_dict(self) -> dict:
        """JSON-ready dict (input_shape as a list)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LatencyStats:
        """Inverse of `to_dict`; raises KeyError/TypeError/ValueError on a malformed dict."""
        kw = {f.name: d[f.name] for f in fields(cls)}
        kw["input_shape"] = tuple(int(x) for x in kw["input_shape"])
        for name in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms"):
            kw[name] = float(kw[name])
        return cls(**kw)


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _label(model: Any) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<bytes>"


def _source(model: ModelLike) -> bytes | str:
    """What InferenceSession opens: a path stays a path (external data next to it), a proto becomes bytes."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise LatencyError(f"model file {path} not found")
        return path
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= 2**31 - 1:
            raise LatencyError("model is > 2 GB; save it with external data and pass the file path")
        return model.SerializeToString()
    raise LatencyError(f"cannot time a {type(model).__name__}; pass ONNX bytes, a path or a ModelProto")


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


def _provider_chain(target: Target) -> list[tuple[str, dict]]:
    if target.provider == "cpu":
        return [(CPU, {})]
    chain: list[tuple[str, dict]] = []
    if target.provider in ("auto", "tensorrt"):
        cache_dir = target.trt_cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "onnxconet", "trt"
        )
        opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir}
        opts |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": cache_dir}
        chain.append((TRT, opts))
    chain.append((CUDA, {"device_id": 0}))
    return chain + [(CPU, {})]


def _session_options(target: Target, spin: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = target.resolved_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: "nodes not assigned to the preferred EP" is expected
    if not spin:  # idle intra-op threads block instead of busy-waiting
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def make_session(
    model: ModelLike, target: Target, *, spin: bool = True
) -> tuple[ort.InferenceSession, str | None]:
    """Create an onnxruntime session on the best provider of `target` that really loads.

    Args:
        model: ONNX bytes, a path (opened from the path, so external data works) or a ModelProto.
        target: provider, threads and strictness.
        spin: let idle intra-op threads busy-wait (onnxruntime's default, lowest latency for
            back-to-back runs). Turn off when several sessions take turns on the same cores.

    Returns:
        The session and a one-line warning when the asked provider could not load (else None;
        "auto" never warns, it logs what it chose).

    Raises:
        LatencyError: the model cannot be loaded, or `target.strict` and the asked provider did not load.
    """
    src, label = _source(model), _label(model)
    chain = _provider_chain(target)
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
    so = _session_options(target, spin)
    while True:
        try:
            session = ort.InferenceSession(src, sess_options=so, providers=chain, enable_fallback=0)
            break
        except Exception as e:  # onnxruntime raises its own pybind classes, not RuntimeError
            if len(chain) == 1:
                raise LatencyError(f"onnxruntime cannot load model {label}: {_first_line(e)}") from e
            reasons.append(f"{chain[0][0]}: {_first_line(e)}")
            chain = chain[1:]
    used = session.get_providers()[0]
    wanted = _ASKED.get(target.provider)
    for p, _ in chain:  # providers before the one used loaded silently-not (onnxruntime logs why)
        if p == used:
            break
        reasons.append(f"{p}: did not load (see onnxruntime's log for the missing library)")
    why = "; ".join(reasons) or "unknown reason"
    if target.provider == "auto":
        log.info("latency target auto -> %s%s", used, f" ({why})" if used == CPU and reasons else "")
        return session, None
    if used == wanted:
        return session, None
    if target.strict:
        raise LatencyError(
            f"provider {target.provider} ({wanted}) did not load, {used} did ({why}); drop strict"
        )
    fallback = f"asked for {target.provider} ({wanted}) but measuring on {used}: {why}"
    log.warning("%s", fallback)
    return session, fallback


def _input_shape(dims: list, target: Target, name: str, label: str) -> tuple[int, ...]:
    """Concrete input shape: the model's dims (or target.input_shape) with the batch of target."""
    batch = dims[0] if dims else None
    if isinstance(batch, int) and batch > 0 and batch != target.batch:
        raise LatencyError(
            f"model {label} was exported with batch {batch} but the target batch is {target.batch};"
            f" export/slice it with batch {target.batch}"
        )
    if target.input_shape is not None:
        shape = (target.batch, *target.input_shape[1:])
        bad = len(shape) != len(dims) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(dims[1:], shape[1:], strict=True)
        )
        if bad:
            raise LatencyError(
                f"target input_shape {target.input_shape} does not fit input {name!r} {dims} of {label}"
            )
        return shape
    symbolic = [d for d in dims[1:] if not (isinstance(d, int) and d > 0)]
    if symbolic:
        raise LatencyError(f"input {name!r} of {label} has symbolic dims {dims}; set Target.input_shape")
    return (target.batch, *dims[1:])


class Runner:
    """One session and its input feed, timed one inference at a time.

    On CUDA/TensorRT the input lives on the device and outputs are bound there (IOBinding), so
    host-device copies are not timed.
    """

    def __init__(self, model: ModelLike, target: Target, seed: int = 0, *, spin: bool = True):
        self.target = target
        self.session, self.fallback = make_session(model, target, spin=spin)
        self.provider: str = self.session.get_providers()[0]
        self.threads = target.resolved_threads
        label = _label(model)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise LatencyError(f"model {label} has {len(inputs)} inputs; latency needs exactly one")
        inp = inputs[0]
        if inp.type not in _DTYPES:
            raise LatencyError(f"input {inp.name!r} of {label} has type {inp.type}; need a float tensor")
        self.input_name: str = inp.name
        self.input_shape = _input_shape(list(inp.shape), target, inp.name, label)
        x = np.random.default_rng(seed).standard_normal(self.input_shape).astype(_DTYPES[inp.type])
        self._feed = {inp.name: x}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._binding = None
        if self.provider in _GPU_PROVIDERS:
            self._binding = self.session.io_binding()
            self._x_device = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)  # kept alive while bound
            self._binding.bind_ortvalue_input(inp.name, self._x_device)
            for name in self._outputs:
                self._binding.bind_output(name, "cuda", 0)

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


def median_ci(samples: np.ndarray | list[float]) -> tuple[float, float, float]:
    """Median and its distribution-free 95% confidence interval (lo, hi); see the module docstring."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    med = float(np.median(x))
    if n < 6:  # too few samples for any 95% order-statistic interval
        return med, float(x[0]) if n else math.nan, float(x[-1]) if n else math.nan
    half = _Z95 * math.sqrt(n) / 2
    j = max(1, math.floor(n / 2 - half))  # 1-based ranks
    k = min(n, math.ceil(1 + n / 2 + half))
    return med, float(x[j - 1]), float(x[k - 1])


def _stable(samples: list[float], rel_ci: float) -> bool:
    if len(samples) < 6:
        return False
    med, lo, hi = median_ci(samples)
    return (hi - lo) / 2 < rel_ci * abs(med)


def _stats(times_s: list[float], runner: Runner) -> LatencyStats:
    ms = np.asarray(times_s) * 1e3
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        runs=len(ms),
        provider=runner.provider,
        requested=runner.target.provider,
        fallback=runner.fallback,
        threads=runner.threads,
        batch=runner.target.batch,
        input_shape=tuple(runner.input_shape),
        onnxruntime=ort.__version__,
    )


def _loop(step: Callable[[int], float], warm: Callable[[], object], budget: tuple) -> list[float]:
    """Warm up, then call step(i) (which returns the sample to judge) until the median is stable.

    `max_seconds` bounds warm-up plus timed runs (warm-up gets at most a fifth of it, and at least one
    run); it is checked between runs, so the overshoot is one run. `min_n` yields to `max_seconds`.
    """
    warmup, min_n, max_n, max_seconds, rel_ci = budget
    start = time.perf_counter()
    for i in range(max(1, warmup)):
        warm()
        if i + 1 < warmup and time.perf_counter() - start > max_seconds / 5:
            log.debug("warm-up cut at %d runs by max_seconds", i + 1)
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
                log.debug("stopped by max_seconds=%.2f after %d runs", max_seconds, len(samples))
                break
            if len(samples) >= next_check:  # every ~5%: a sort per run costs more than a tiny model
                if _stable(samples, rel_ci):
                    break
                next_check = len(samples) + max(1, len(samples) // 20)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def measure(
    model: ModelLike,
    target: Target,
    *,
    warmup: int = 10,
    min_runs: int = 20,
    max_runs: int = 2000,
    max_seconds: float = 5.0,
    rel_ci: float = 0.02,
) -> LatencyStats:
    """Latency of one model on `target`.

    Args:
        model: ONNX bytes, path or ModelProto.
        target: where to run.
        warmup: untimed runs first (the first runs allocate and tune kernels).
        min_runs: timed runs before the stopping rule is tried.
        max_runs: stop after this many timed runs.
        max_seconds: stop after this wall time (warm-up included, session creation not).
        rel_ci: stop when the 95% CI half-width of the median is below rel_ci * median.

    Returns:
        Statistics over the timed runs.
    """
    runner = Runner(model, target)
    times = _loop(
        lambda _: runner.run_once(), runner.run_once, (warmup, min_runs, max_runs, max_seconds, rel_ci)
    )
    stats = _stats(times, runner)
    log.debug(
        "measured %s: %.4f ms median, %d runs, %s", _label(model), stats.median_ms, stats.runs, stats.provider
    )
    return stats


@dataclass
class RelativeStats:
    """Candidate latency relative to a reference, measured interleaved.

    The absolute `candidate` / `reference` stats come from sessions without thread spinning (see
    `measure_relative`), so they can be a little slower than what `measure` reports.

    Attributes:
        ratio: the candidate's 10th-percentile time / the reference's 10th-percentile time (see
            `measure_relative`).
        paired_ratio: median over rounds of candidate time / reference time.
        ratio_p10: 10th percentile of the per-round ratios.
        ratio_p90: 90th percentile of the per-round ratios.
        candidate: statistics of the candidate's runs in those rounds.
        reference: statistics of the reference's runs in those rounds.
        rounds: number of timed rounds.
    """

    ratio: float
    ratio_p10: float
    ratio_p90: float
    candidate: LatencyStats
    reference: LatencyStats
    rounds: int
    paired_ratio: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = {k: getattr(self, k) for k in ("ratio", "paired_ratio", "ratio_p10", "ratio_p90", "rounds")}
        return d | {"candidate": self.candidate.to_dict(), "reference": self.reference.to_dict()}


def measure_relative(
    candidate: ModelLike,
    reference: ModelLike,
    target: Target,
    *,
    warmup: int = 10,
    min_rounds: int = 20,
    max_rounds: int = 1000,
    max_seconds: float = 5.0,
    rel_ci: float = 0.02,
) -> RelativeStats:
    """Latency of `candidate` relative to `reference`, both timed in this process, interleaved.

    Each round runs both once (A B, then B A in the next round, so neither always runs on a
    cache warmed by the other), so slow drifts (clock, thermal, background load) hit both models alike.
    The ratio is that of the two models' 10th-percentile times, timeit-style: on a machine shared
    with other work a run is either undisturbed or preempted, and preemption only adds time. The
    median of the per-round ratios (`paired_ratio`) is the better estimator only on a quiet machine;
    measured on this project's 2-core CI kind with two training jobs running (digits CNN, 1 thread,
    a candidate at 0.52 of the MACs, 4 repeats): paired median 0.165-0.26 (about half the rounds
    caught the reference preempted), 10th-percentile ratio 0.57-0.60; quiet, the two agree within
    the measurement noise. Stops like `measure`, judging the median of the per-round ratios.

    Raises:
        LatencyError: a model cannot be loaded, or the two ended up on different providers.
    """
    # No spinning: after its run, one session's idle threads would busy-wait on the cores the other
    # session needs next; on 2 cores that spread the per-round ratios from ~0.9-1.1 to ~0.05-20.
    cand, ref = Runner(candidate, target, spin=False), Runner(reference, target, spin=False)
    if cand.provider != ref.provider:
        raise LatencyError(
            f"candidate runs on {cand.provider} but reference on {ref.provider}; cannot compare"
        )
    tc: list[float] = []
    tr: list[float] = []

    def round_(i: int) -> float:
        if i % 2:
            b, a = ref.run_once(), cand.run_once()
        else:
            a, b = cand.run_once(), ref.run_once()
        tc.append(a)
        tr.append(b)
        return a / b

    ratios = _loop(
        round_,
        lambda: (cand.run_once(), ref.run_once()),
        (warmup, min_rounds, max_rounds, max_seconds, rel_ci),
    )
    r = np.asarray(ratios)
    return RelativeStats(
        ratio=float(np.percentile(tc, 10) / max(np.percentile(tr, 10), 1e-12)),
        paired_ratio=float(np.median(r)),
        ratio_p10=float(np.percentile(r, 10)),
        ratio_p90=float(np.percentile(r, 90)),
        candidate=_stats(tc, cand),
        reference=_stats(tr, ref),
        rounds=len(r),
    )
