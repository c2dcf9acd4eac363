"""Latency of ONNX models as a deployment sees it, measured with onnxruntime in runner subprocesses.

Ground truth is **latency as deployed**: each model alone in its own process, onnxruntime's default session
options (intra-op threads spin between runs) at the thread count the user deploys with, runs back to back.
Three ways to measure, all in `runner.py` subprocesses (`process.py`), never in this process:

- `measure`: one model, alone in a fresh runner process (absolute latency).
- `measure_isolated`: the deployed ratio of two models, each timed alone in a fresh process, the processes
  alternated A B, B A, ... over `pairs` pairs; ratio of the medians. What the final check of a search,
  `profile --compare --isolated` and every decision of a search (reachability, confirmation) use. About
  `pairs` × 2 × (0.4 s of process start + session + `seconds`).
- `measure_relative` / `PairedMeasurer`: the in-loop estimate the search takes for every candidate (one
  candidate in < 2 s for resnet18). Two runner processes live side by side, one holding the candidate, one the
  reference, both with spinning on; they take turns in bursts of ~0.1 s, never running at the same time. A round
  is A B then B A; its ratio is the geometric mean of the two (candidate burst median / reference burst median),
  so whatever the order does cancels; the ratio is the median over rounds. The first 50 ms of each burst are not
  timed: the runner that just finished keeps its threads spinning for a while, and at 2 threads on 2 cores
  a 10 ms warm-up read the second burst of each turn ~30 % slow (the order effect that made the built-in
  default search under-read every candidate by ~25 % on 2026-12-04; docs/measurements.md).

Why not both sessions in this process, one run each in turn (the method before): without spinning every
parallel region pays a thread wake-up, and interleaving single runs evicts each model's caches for the other;
measured on the 2-core CI kind over 12 pairs, that estimate was off the deployed ratio by up to 29 % (at one
thread too), while the paired-process bursts agree within a few percent (docs/measurements.md).

Other programs on the cores: a `LoadWatch` books the CPU time other processes took while measuring; a
measurement is `disturbed` when they took cores the session needed (see `process.disturbed`). Nothing
recovers a quiet-machine figure from a machine whose cores are taken (as deployed, a 2-thread session on a
2-core machine beside one busy process is a different latency), so disturbed measurements are flagged and
re-measured by the callers that decide something, and warned about.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import onnx

from onnxconet.errors import LatencyError
from onnxconet.latency import device as devices
from onnxconet.latency.process import LoadWatch, disturbed, label_of, model_file
from onnxconet.latency.runner import (  # noqa: F401  (re-exported: the runner is standalone)
    ASKED,
    CPU,
    CUDA,
    TRT,
    RunnerError,
    TimedSession,
    median_ci,
    physical_cores,
    stable,
)
from onnxconet.latency.runner import make_session as _make_session

log = logging.getLogger(__name__)

ModelLike = bytes | str | os.PathLike | onnx.ModelProto
# method names, recorded with every ratio and in cache keys; "paired-processes" (its rounds one-sided, 10 ms warm-up)
# read the second burst of a turn slow, so its cached figures are not reused
PAIRED = "paired-processes-abba"
ISOLATED = "isolated-processes"


@dataclass(frozen=True)
class Target:
    """Where and how a model is timed: the deployment.

    Attributes:
        provider: "auto" (TensorRT, else CUDA, else CPU: whichever really loads), "cpu", "cuda" or "tensorrt".
        threads: intra-op threads; 0 leaves onnxruntime's default (the physical cores this process may use).
        batch: batch size of the timed input.
        input_shape: (N, C, H, W) of the input; None reads it from the model. Its batch entry is
            always replaced by `batch`.
        strict: raise LatencyError when the asked provider does not load instead of falling back.
        trt_cache_dir: TensorRT engine cache folder (default: ~/.cache/onnxconet/trt).
        session_config: onnxruntime session config entries the deployment sets, as (key, value) pairs (e.g.
            (("session.intra_op.allow_spinning", "0"),)); empty = onnxruntime's defaults.
        device: where the model runs: "" = this machine, "ssh://user@host[:port]" or "http://host:port" (an
            `onnxconet agent`); see `device.py`.
    """

    provider: str = "auto"
    threads: int = 0
    batch: int = 1
    input_shape: tuple[int, ...] | None = None
    strict: bool = False
    trt_cache_dir: str | None = None
    session_config: tuple[tuple[str, str], ...] = ()
    device: str = devices.LOCAL

    def __post_init__(self) -> None:
        devices.check_url(self.device)
        if self.provider not in ("auto", *ASKED):
            raise LatencyError(f"unknown provider {self.provider!r}; use auto, cpu, cuda or tensorrt")
        if self.threads < 0 or self.batch < 1:
            raise LatencyError(
                f"bad target threads={self.threads} batch={self.batch}; need threads>=0, batch>=1"
            )
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        config = self.session_config.items() if isinstance(self.session_config, dict) else self.session_config
        object.__setattr__(self, "session_config", tuple(sorted((str(k), str(v)) for k, v in config)))

    @property
    def resolved_threads(self) -> int:
        """Intra-op thread count really used (`threads`, or the device's physical core count when 0)."""
        return self.threads or self.on().physical_cores()

    def on(self) -> devices.Device:
        """The device this target runs on (connected once per process)."""
        return devices.get(self.device)

    @property
    def device_name(self) -> str:
        """How results and predictors name the device: its URL, or "local" for this machine."""
        return self.device or devices.LOCAL_NAME

    def load_request(self, path: str, label: str) -> dict:
        """The runner's `load` request for the model at `path`."""
        return {
            "model": path,
            "label": label,
            "provider": self.provider,
            "threads": self.threads,
            "batch": self.batch,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "strict": self.strict,
            "config": dict(self.session_config),
            "trt_cache_dir": self.trt_cache_dir,
        }

    def describe(self) -> str:
        """How this target runs a model, in words (for reports)."""
        threads = f"{self.threads} intra-op threads" if self.threads else "onnxruntime's default threads"
        extra = ", ".join(f"{k}={v}" for k, v in self.session_config)
        where = "" if self.device == devices.LOCAL else f" on {self.on().describe()}"
        return (
            f"{self.provider} provider, {threads}, batch {self.batch}"
            + (f", session config {extra}" if extra else ", default session options")
            + where
        )


def parse_session_config(items: list[str] | None) -> dict[str, str]:
    """["KEY=VALUE", ...] (the CLI's --ort-config) -> {KEY: VALUE}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LatencyError(
                f"--ort-config {item!r} is not KEY=VALUE; e.g. --ort-config session.intra_op.allow_spinning=0"
            )
        out[key.strip()] = value.strip()
    return out


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


def _stats(times_ms: list[float], loaded: dict, target: Target) -> LatencyStats:
    ms = np.asarray(times_ms, dtype=np.float64)
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        runs=len(ms),
        provider=loaded["provider"],
        requested=target.provider,
        fallback=loaded.get("fallback"),
        threads=int(loaded["threads"]),
        batch=target.batch,
        input_shape=tuple(int(d) for d in loaded["input_shape"]),
        onnxruntime=loaded["onnxruntime"],
    )


def _warn_fallback(loaded: dict) -> None:
    if loaded.get("fallback"):
        log.warning("%s", loaded["fallback"])


def make_session(model: ModelLike, target: Target):
    """An onnxruntime session for `model` in *this* process on the best provider of `target` that loads:
    (session, one-line fallback note or None). For checks (does CUDA load here?), not for timing.

    Raises:
        LatencyError: the model cannot be loaded, or `target.strict` and the asked provider did not load.
    """
    with model_file(model) as path:
        try:
            return _make_session(path, target.load_request(path, label_of(model)), label_of(model))
        except RunnerError as e:
            raise LatencyError(str(e)) from None


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
    """Latency of one model on `target`, alone in a fresh runner process (as deployed).

    Args:
        model: ONNX bytes, path or ModelProto.
        target: where to run.
        warmup: untimed runs first (the first runs allocate and tune kernels).
        min_runs: timed runs before the stopping rule is tried.
        max_runs: stop after this many timed runs.
        max_seconds: stop after this wall time (warm-up included, process start and session creation not).
        rel_ci: stop when the 95% CI half-width of the median is below rel_ci * median.

    Returns:
        Statistics over the timed runs.
    """
    dev = target.on()
    with dev.job(), dev.model_path(model) as path, dev.runner() as runner:
        loaded = runner.request("load", **target.load_request(path, label_of(model)))
        _warn_fallback(loaded)
        timed = runner.request(
            "measure", warmup=warmup, min_runs=min_runs, max_runs=max_runs, max_seconds=max_seconds,
            rel_ci=rel_ci,
        )  # fmt: skip
    stats = _stats(timed["times_ms"], loaded, target)
    log.debug("measured %s: %.4f ms median, %d runs", label_of(model), stats.median_ms, stats.runs)
    return stats


@dataclass
class RelativeStats:
    """Candidate latency relative to a reference.

    Attributes:
        ratio: candidate / reference latency: the median over rounds (A B + B A) of the per-round ratio (`PAIRED`), or the
            median of the candidate's per-process medians over the reference's (`ISOLATED`).
        ratio_p10, ratio_p90: 10th and 90th percentiles of the per-round (per-pair) ratios: the spread.
        ratio_ci: 95% confidence interval of the median per-round (per-pair) ratio (order statistics; with
            fewer than 6 rounds, their range): how far another measurement of the same files may land.
        candidate, reference: statistics of each model's timed runs, pooled.
        rounds: rounds (`PAIRED`) or process pairs (`ISOLATED`).
        method: `PAIRED` or `ISOLATED`.
        ratios: the per-round (per-pair) ratios.
        load: CPUs that other programs kept busy while measuring (None where it cannot be read).
        disturbed: they took cores the sessions needed (`process.disturbed`): do not trust this figure.
        process_medians: (`ISOLATED` only) each process's median ms, (candidate's, reference's) in pair order:
            the per-process spread under the ratio (tools/process_spread.py). Not in `to_dict`.
    """

    ratio: float
    ratio_p10: float
    ratio_p90: float
    candidate: LatencyStats
    reference: LatencyStats
    rounds: int
    method: str = PAIRED
    ratios: list[float] | None = None
    load: float | None = None
    disturbed: bool = False
    ratio_ci: list[float] | None = None
    process_medians: tuple[list[float], list[float]] | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        keys = (
            "ratio",
            "ratio_p10",
            "ratio_p90",
            "ratio_ci",
            "rounds",
            "method",
            "ratios",
            "load",
            "disturbed",
        )
        d = {k: getattr(self, k) for k in keys}
        return d | {"candidate": self.candidate.to_dict(), "reference": self.reference.to_dict()}


def _relative(ratios, cand: tuple, ref: tuple, target, method, watch, ratio=None) -> RelativeStats:
    """RelativeStats from the per-round (per-pair) `ratios` and each model's (times in ms, load answer)."""
    (cand_ms, loaded_c), (ref_ms, loaded_r) = cand, ref
    r = np.asarray(ratios, dtype=np.float64)
    load = watch.load()
    rel = RelativeStats(
        ratio=float(np.median(r)) if ratio is None else float(ratio),
        ratio_p10=float(np.percentile(r, 10)),
        ratio_p90=float(np.percentile(r, 90)),
        ratio_ci=[round(float(x), 5) for x in median_ci(r)[1:]],
        candidate=_stats(cand_ms, loaded_c, target),
        reference=_stats(ref_ms, loaded_r, target),
        rounds=len(r),
        method=method,
        ratios=[round(float(x), 5) for x in r],
        load=None if load is None else round(load, 3),
        disturbed=disturbed(load, target.resolved_threads),
    )
    if rel.disturbed:
        log.warning(
            "other programs kept %.1f CPUs busy while measuring (%s, %d threads): this latency ratio (%.3f) is "
            "not what a quiet machine gives", load, method, target.resolved_threads, rel.ratio,
        )  # fmt: skip
    return rel


class PairedMeasurer:
    """The in-loop measurement (see the module docstring): two runner processes, the reference loaded once,
    candidates loaded one after another. Use as a context manager, or `close()` it."""

    def __init__(
        self,
        reference: ModelLike,
        target: Target,
        *,
        burst_seconds: float = 0.1,
        warmup_seconds: float = 0.05,
    ) -> None:
        self.target = target
        self.burst_seconds, self.warmup_seconds = burst_seconds, warmup_seconds
        self.device = target.on()
        self.cand = self.ref = None
        self._ref_label = label_of(reference)
        self._ref_file = self.device.model_path(reference)
        try:
            self._ref_path = self._ref_file.__enter__()
            with self.device.job():  # the reference must load: fail here, not at the first candidate
                self._start()
                if not self.device.keeps_runners:
                    self._stop()
        except BaseException:
            self.close()
            raise
        _warn_fallback(self.loaded_ref)

    def _start(self) -> None:
        """Both runners, the reference loaded (they live across candidates where the device keeps runners; an
        agent's end with each job, so another client can have the device between candidates)."""
        if self.cand is None:
            self.cand, self.ref = self.device.runner(), self.device.runner()
            self.loaded_ref = self.ref.request(
                "load", **self.target.load_request(self._ref_path, self._ref_label)
            )

    def _stop(self) -> None:
        for runner in (self.cand, self.ref):
            if runner is not None:
                runner.close()
        self.cand = self.ref = None

    def compare(
        self,
        candidate: ModelLike,
        *,
        min_rounds: int = 3,
        max_rounds: int = 100,
        max_seconds: float = 2.0,
        rel_ci: float = 0.02,
    ) -> RelativeStats:
        """`candidate`'s latency relative to the reference.

        Rounds (four bursts: candidate, reference, reference, candidate) go on until the 95% CI of the median
        per-round ratio is within `rel_ci` of it (after `min_rounds`), or `max_rounds`, or `max_seconds` of
        timing (checked after each round: a round is ~0.6 s at the default bursts).

        Raises:
            LatencyError: a model cannot be loaded or run, or the two ended up on different providers.
        """
        with self.device.job(), self.device.model_path(candidate) as path:
            self._start()
            try:
                return self._compare(path, label_of(candidate), min_rounds, max_rounds, max_seconds, rel_ci)
            finally:
                if not self.device.keeps_runners:
                    self._stop()

    def _compare(self, path: str, label: str, min_rounds, max_rounds, max_seconds, rel_ci) -> RelativeStats:
        loaded = self.cand.request("load", **self.target.load_request(path, label))
        # the window opens after the load: a fresh runner's start-up and the load took CPU before it, which
        # booked into it would hide other programs' load (a 0.5 s window then read 0.24 CPUs of a busy one)
        watch = LoadWatch(active=self.device.local)
        ref_cpu = self.ref.cpu_s
        if loaded["provider"] != self.loaded_ref["provider"]:
            raise LatencyError(
                f"candidate runs on {loaded['provider']} but reference on {self.loaded_ref['provider']};"
                " cannot compare"
            )
        cand_cpu = self.cand.cpu_s
        cand_ms: list[float] = []
        ref_ms: list[float] = []
        ratios: list[float] = []
        t0 = time.perf_counter()
        while len(ratios) < max_rounds:
            halves = []
            for order in ((self.cand, self.ref), (self.ref, self.cand)):
                got = {}
                for runner in order:
                    got[id(runner)] = runner.request(
                        "time", seconds=self.burst_seconds, warmup_seconds=self.warmup_seconds
                    )["times_ms"]
                c, r = got[id(self.cand)], got[id(self.ref)]
                cand_ms += c
                ref_ms += r
                halves.append(float(np.median(c) / max(np.median(r), 1e-12)))
            ratios.append(math.sqrt(halves[0] * halves[1]))
            if len(ratios) >= min_rounds and (
                stable(ratios, rel_ci) or time.perf_counter() - t0 >= max_seconds
            ):
                break
        watch.add_runner(cand_cpu, self.cand.cpu_s)
        watch.add_runner(ref_cpu, self.ref.cpu_s)
        rel = _relative(ratios, (cand_ms, loaded), (ref_ms, self.loaded_ref), self.target, PAIRED, watch)
        self.cand.request("unload")
        _warn_fallback(loaded)
        return rel

    def close(self) -> None:
        self._stop()
        if self._ref_file is not None:
            self._ref_file.__exit__(None, None, None)
            self._ref_file = None

    def __enter__(self) -> PairedMeasurer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_relative(
    candidate: ModelLike,
    reference: ModelLike,
    target: Target,
    *,
    min_rounds: int = 3,
    max_rounds: int = 100,
    max_seconds: float = 2.0,
    rel_ci: float = 0.02,
) -> RelativeStats:
    """`candidate`'s latency relative to `reference`, the in-loop way (`PairedMeasurer`), in fresh runners."""
    with PairedMeasurer(reference, target) as m:
        return m.compare(
            candidate, min_rounds=min_rounds, max_rounds=max_rounds, max_seconds=max_seconds, rel_ci=rel_ci
        )


# `measure_isolated` adds pairs while the per-pair ratios spread more than this (max - min over the median)
PAIR_SPREAD = 0.1


def _process_medians(runs: dict[str, list[list[float]]]) -> tuple[list[float], list[float]]:
    """Each process's median ms so far: (the candidate's, the reference's), in pair order."""
    return [float(np.median(t)) for t in runs["c"]], [float(np.median(t)) for t in runs["r"]]


def _isolated_ratio(med_c: list[float], med_r: list[float]) -> tuple[float, list[float]]:
    """(the ratio `measure_isolated` reports: the median of the candidate's per-process medians over the
    reference's, the per-pair ratios) of the process medians so far: what the stop rules judge and the figure
    reported are one computation."""
    pair = [c / r for c, r in zip(med_c, med_r, strict=True)]
    return float(np.median(med_c) / np.median(med_r)), pair


def ci_room(ratio: float, ci) -> float:
    """How far another measurement of the same files may land over `ratio`: the width of its 95 % CI (`ci`: lo,
    hi; twice the half-width), or twice the CI's upper end over the ratio where that is more (0 without a CI).

    The width, not the upper half: the ratio `measure_isolated` reports (the median of each model's per-process
    medians, divided) need not sit in the middle of the per-pair ratios' CI. On a VM whose speed flips between two
    phases for seconds at a time (the candidate 1.5x slower in the slow one, the reference 1.35x: per-pair ratios
    of one file 0.21-0.46), it sat at the CI's top, the upper half left a room of 0.003 at a 0.3 budget, and the
    same file measured 0.25-0.35 over the next minutes (docs/measurements.md, "The room")."""
    if not ci:
        return 0.0
    lo, hi = ci
    return max(hi - lo, 2 * (hi - ratio), 0.0)


def _room(runs: dict[str, list[list[float]]]) -> float:
    """`ci_room` of the pairs so far, at the ratio `measure_isolated` reports (the median of the candidate's
    per-process medians over the reference's)."""
    med_c, med_r = _process_medians(runs)
    if not med_c:
        return math.inf
    ratio, pair = _isolated_ratio(med_c, med_r)
    return ci_room(ratio, median_ci(pair)[1:])


def _spread(runs: dict[str, list[list[float]]]) -> float:
    """(max - min) / median of the per-pair ratios so far."""
    med_c, med_r = _process_medians(runs)
    if not med_c:
        return 0.0
    r = _isolated_ratio(med_c, med_r)[1]
    return (max(r) - min(r)) / float(np.median(r))


def measure_isolated(
    candidate: ModelLike,
    reference: ModelLike,
    target: Target,
    *,
    pairs: int = 4,
    seconds: float = 1.0,
    warmup_seconds: float = 0.25,
    max_pairs: int | None = None,
    max_room: float | None = None,
) -> RelativeStats:
    """The deployed ratio: each model alone in a fresh runner process, `pairs` pairs alternated (A B, B A, ...),
    each process warming up for `warmup_seconds` and then running back to back for `seconds`; the ratio of the
    medians of the per-process medians.

    With `max_pairs` > `pairs`, pairs are added while the per-pair ratios spread more than `PAIR_SPREAD` (max -
    min over the median): a pair caught in a slow phase of the machine (on a shared VM, 2 threads can run at
    1-thread speed for minutes) is then outvoted instead of deciding the median.

    With `max_room`, instead, pairs are added (up to `max_pairs`) while the room another measurement may need
    (`ci_room`: the width of the ratio's 95 % CI) is over `max_room`. Under 11 pairs the CI's ends are the
    extreme pairs themselves (`median_ci`: under 6, the range; at 6-10 the interval's order statistics are still
    the extremes), so one pair in a slow phase sets it; from 11 on, the interval leaves the extremes out and the
    pooled pairs decide.

    Raises:
        LatencyError: a model cannot be loaded or run, or the two ended up on different providers.
    """
    if pairs < 1:
        raise LatencyError(f"pairs must be >= 1, got {pairs}")
    max_pairs = max(pairs, max_pairs or pairs)
    dev = target.on()
    watch = LoadWatch(active=dev.local)
    runs: dict[str, list[list[float]]] = {"c": [], "r": []}
    loaded: dict[str, dict] = {}
    with dev.job(), dev.model_path(candidate) as cand_path, dev.model_path(reference) as ref_path:
        files = {"c": (cand_path, label_of(candidate)), "r": (ref_path, label_of(reference))}
        p = 0
        while p < pairs or (
            p < max_pairs and (_spread(runs) > PAIR_SPREAD if max_room is None else _room(runs) > max_room)
        ):
            for which in ("c", "r") if p % 2 == 0 else ("r", "c"):
                with dev.runner() as runner:
                    loaded[which] = runner.request("load", **target.load_request(*files[which]))
                    times = runner.request(
                        "time", seconds=seconds, warmup_seconds=warmup_seconds, min_runs=5
                    )["times_ms"]
                    watch.add_runner(0.0, runner.cpu_s)
                runs[which].append(times)
            p += 1
    if loaded["c"]["provider"] != loaded["r"]["provider"]:
        raise LatencyError(
            f"candidate runs on {loaded['c']['provider']} but reference on {loaded['r']['provider']};"
            " cannot compare"
        )
    med_c, med_r = _process_medians(runs)
    _warn_fallback(loaded["c"])
    ratio, pair = _isolated_ratio(med_c, med_r)
    rel = _relative(
        pair,
        ([x for t in runs["c"] for x in t], loaded["c"]),
        ([x for t in runs["r"] for x in t], loaded["r"]),
        target,
        ISOLATED,
        watch,
        ratio=ratio,
    )
    rel.process_medians = (med_c, med_r)
    return rel
