"""A search on a shared study: `search --workers N` / `--storage URL` (the run's first process) and
`onnxconet worker` (a process that joins it, here or on another machine).

The first process prepares the run once (export, teacher, baseline.onnx, the baseline's latency, the latency
predictor, anneal's start) in the run folder and writes what the others need into the study (`StudyMeta`);
it starts N-1 worker processes and works as the N-th. A joining worker rebuilds the same context from the
folder (the teacher from teacher.pt, the predictor from its file, nothing measured again) and runs trials
(search/workers.py). When the study holds its trials, the first process exports history.jsonl from it and
finishes as a one-process run does (confirm, fine-tune, race, best.onnx, report). `--resume` re-attaches to
the study: finished trials stay, the rest are run.

Timing stays honest: on one machine the workers share a `MeasureGate` (latency/gate.py): a worker measures
alone, the others' training paused; with `--target` the device times one job at a time itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from onnxconet.errors import OnnxconetError
from onnxconet.files import atomic_write
from onnxconet.latency.gate import GatedLoader, MeasureGate, run_gate
from onnxconet.search.base import Setup
from onnxconet.search.config import SearchConfig, config_json
from onnxconet.search.context import KnownBaseline, RunContext, build_context, history_header
from onnxconet.search.driver import Loop
from onnxconet.search.finish import SearchRun
from onnxconet.search.setup import check_reachable, cost_model, make_evaluator, make_strategy, width_space
from onnxconet.search.study import (
    StudyMeta,
    accounting,
    create_study,
    default_storage,
    existing,
    finished,
    load_study,
    open_storage,
    records,
    redact,
)
from onnxconet.search.workers import StudyWorker, best_candidate

log = logging.getLogger(__name__)


def storage_of(cfg: SearchConfig) -> str:
    return cfg.storage or default_storage(cfg.out)


def study_name(cfg: SearchConfig) -> str:
    return cfg.study or Path(cfg.out).resolve().name


def check_study(cfg: SearchConfig) -> None:
    """Before any training: the storage opens, and the study is new or --resume continues it."""
    existing(open_storage(storage_of(cfg), cfg.heartbeat), study_name(cfg), cfg.resume)


def where_on_study(cfg: SearchConfig) -> str:
    """Where a run on a study stopped, for its last line: how many of its trials had finished."""
    name = study_name(cfg)
    try:
        study, _ = load_study(open_storage(storage_of(cfg)), name)
    except OnnxconetError:
        return f"before its study {name!r} was published"
    return f"with {len(finished(study.get_trials(deepcopy=False)))} of {cfg.trials} trials finished in study {name!r}"


def search_on_study(ctx: RunContext, procs: list[subprocess.Popen] = ()) -> SearchRun:
    """The first process's part (module docstring): prepare, publish the study, release the workers started by
    `local_workers` (`procs`), work, collect."""
    cfg = ctx.cfg
    url, name = storage_of(cfg), study_name(cfg)
    storage = open_storage(url, cfg.heartbeat)
    old = existing(storage, name, cfg.resume, ctx.cg.fingerprint())
    space = width_space(ctx)
    cost = cost_model(ctx, space)
    check_reachable(ctx, space, cost)
    strategy = make_strategy(ctx, space, cost, start=old.start if old else None)
    meta = StudyMeta(
        config=config_json(replace(cfg, resume=False)), out=str(Path(cfg.out).resolve()), budget=ctx.budget.ratio,
        baseline={"ms": ctx.budget.ms / ctx.budget.ratio, "accuracy": ctx.baseline.accuracy,
                  "test_accuracy": ctx.baseline.test_accuracy},
        fingerprint=ctx.cg.fingerprint(), trials=cfg.trials, start=strategy.anchor(), heartbeat=cfg.heartbeat,
        observed=list(cost.observed),
    )  # fmt: skip
    study = create_study(storage, name, meta)
    before = len(finished(study.get_trials(deepcopy=False)))
    if before:
        ctx.stage(f"re-attached to study {name!r}: {before} of {cfg.trials} trials finished")
    ctx.stage(
        f"searching: {cfg.trials} trials of {cfg.strategy} on {cfg.workers} worker(s), study {name!r} in "
        f"{redact(url)}"
    )
    release(procs)
    try:
        evaluator, _ran = work(ctx, study, strategy, cfg.trials)
    finally:
        for i, p in enumerate(procs, 1):
            if _wait(p):
                log.warning("worker %d ended with exit code %s: see %s", i, p.returncode, worker_log(cfg, i))
    all_trials = study.get_trials(deepcopy=False)
    counts = accounting(all_trials)
    if counts["lost"]:
        ctx.stage(f"{counts['lost']} trial(s) lost with their worker were run again")
    recs = records(all_trials)[: cfg.trials]
    export_history(ctx, recs)
    loop = Loop(
        strategy, evaluator, strategy.objective, ctx.out, cfg.trials, cost.observe_trial, absorb=False
    )
    loop.load(recs)
    best_candidate(ctx.out, loop.best)
    return SearchRun(loop, Setup(), study=counts)


def work(ctx: RunContext, study, strategy, trials: int, evaluator=None):
    """Run trials in this process (one of the workers) until the study holds `trials`, with `evaluator` (default:
    the run's); returns (the evaluator, the numbers of the trials this process ran)."""
    cfg = ctx.cfg
    evaluator = evaluator or make_evaluator(ctx, strategy)
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg))
    try:
        with measuring_alone(ctx, evaluator):
            ran = StudyWorker(study, strategy, evaluator, trials, ctx.out, cfg.heartbeat, ctx.progress).run()
    finally:
        torch.set_num_threads(threads)
    return evaluator, ran


def _gate(cfg: SearchConfig) -> MeasureGate | None:
    return run_gate(cfg.out, cfg.latency_target)


@contextmanager
def measuring_alone(ctx: RunContext, evaluator) -> Iterator[None]:
    """While the block runs, this process trains and evaluates through the machine's `MeasureGate` and measures
    latency alone (nothing to do when a --target device measures). The gate the run was prepared under
    (`build_context` with --workers) is the one used, and closed at the end."""
    gate = ctx.judge.gate or _gate(ctx.cfg)
    if gate is None:
        yield
        return
    train, val = evaluator.train_loader, evaluator.val_loader
    evaluator.train_loader, evaluator.val_loader = GatedLoader(train, gate), GatedLoader(val, gate)
    ctx.judge.gate, evaluator.busy = gate, gate.shared
    try:
        yield
    finally:
        evaluator.train_loader, evaluator.val_loader, ctx.judge.gate = train, val, None
        evaluator.busy = nullcontext
        gate.close()


def worker_threads(cfg: SearchConfig) -> int:
    """Training threads per worker: --torch-threads, else this machine's cores shared among the workers."""
    return cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(cfg.workers, 1))


def worker_log(cfg: SearchConfig, index: int) -> Path:
    return Path(cfg.out) / f"worker-{index}.log"


def spawn_worker(url: str, name: str, cfg: SearchConfig, index: int) -> subprocess.Popen:
    """`onnxconet worker` for this study, as a child process (its log in the run folder), started before the run
    is prepared: it loads its code, then waits for `release` (a line on its stdin) to join the published study;
    at end of input (this process stopped first) it ends."""
    from onnxconet.latency.device import TOKEN_ENV, token_of

    # secrets through the environment, not the command line (`ps` shows it): the storage's password, and the
    # --target agent's token
    env = dict(os.environ, ONNXCONET_STORAGE=url)
    token = token_of(cfg.latency_target) if cfg.latency_target else None
    if token:
        env[TOKEN_ENV] = token
    cmd = [sys.executable, "-m", "onnxconet", "worker", "--study", name, "--out", str(Path(cfg.out).resolve()),
           "--torch-threads", str(worker_threads(cfg)), "--start-on-stdin"]  # fmt: skip
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(worker_log(cfg, index), "ab") as logf:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT, env=env)


def release(procs: list[subprocess.Popen]) -> None:
    """Let the workers started by `local_workers` join (the study is published)."""
    for p in procs:
        if p.stdin is not None and not p.stdin.closed:
            try:
                p.stdin.write(b"go\n")
                p.stdin.close()
            except OSError:  # it died already: reported when it is waited for
                pass


@contextmanager
def local_workers(cfg: SearchConfig) -> Iterator[list[subprocess.Popen]]:
    """`search --workers N`: the N-1 other workers, started now so their start-up (interpreter, imports: 5-10 s
    on this machine) overlaps this process's preparation. On the way out, workers never released end (end of
    their input), and any still running after an error here are stopped."""
    if cfg.workers <= 1:
        yield []
        return
    url, name = storage_of(cfg), study_name(cfg)
    procs = [spawn_worker(url, name, cfg, i) for i in range(1, cfg.workers)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.stdin is not None and not p.stdin.closed:
                p.stdin.close()  # never released: it ends
        for p in procs:
            _wait(p, grace=30.0)


def _wait(p: subprocess.Popen, grace: float = 30.0) -> int:
    """Wait for a worker that has no trial left (interrupt it if this process is leaving early); its exit code
    (a killed worker's is negative)."""
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def export_history(ctx: RunContext, recs: list[dict]) -> None:
    """history.jsonl from the study: the header, then the finished trials in the order they finished."""
    import json

    lines = [json.dumps(history_header(ctx))] + [json.dumps(r) for r in recs]
    atomic_write(ctx.out / "history.jsonl", "\n".join(lines) + "\n")


def join(url: str, name: str, out: str | None = None, torch_threads: int = 0, wait: float = 0.0,
         progress=None) -> list[int]:  # fmt: skip
    """`onnxconet worker`: rebuild the run of study `name` from its folder and run trials until the study is
    complete. Returns the numbers of the trials this worker ran. `torch_threads`: training threads (0: torch's
    default); `wait`: seconds to wait for the run's first process to publish the study."""
    on_wait = (lambda text: progress("stage", {"text": text})) if progress else None
    _, meta = load_study(open_storage(url), name, wait, on_wait)
    study, meta = load_study(open_storage(url, meta.heartbeat), name)  # beats at the study's rhythm
    cfg = SearchConfig(**_config_args(meta.config))
    cfg.out, cfg.resume, cfg.heartbeat = out or meta.out, True, meta.heartbeat
    for needed in ("baseline.onnx",) + (() if cfg.weights or cfg.pretrain_epochs <= 0 else ("teacher.pt",)):
        if not (Path(cfg.out) / needed).is_file():
            raise OnnxconetError(
                f"{Path(cfg.out) / needed} is missing: a worker reads the run folder of its study ({meta.out}); "
                "mount it here or pass --out to where it is"
            )
    if len(finished(study.get_trials(deepcopy=False))) >= meta.trials:
        return []
    cfg.torch_threads = torch_threads or torch.get_num_threads()
    with preparing(cfg):
        ctx = build_context(cfg, progress, known=KnownBaseline(**meta.baseline))
    with ctx:
        if ctx.cg.fingerprint() != meta.fingerprint:
            raise OnnxconetError(
                f"study {name!r}: this machine exports another model (fingerprint); same code?"
            )
        with preparing(cfg):
            space = width_space(ctx)
            cost = cost_model(ctx, space)
            cost.replay(meta.observed or [])  # the first process's corrections: the same proposals
            strategy = make_strategy(ctx, space, cost, start=meta.start, joining=True)
            evaluator = make_evaluator(ctx, strategy)
        return work(ctx, study, strategy, meta.trials, evaluator)[1]


@contextmanager
def preparing(cfg: SearchConfig) -> Iterator[None]:
    """A joining worker's preparation (export, data, strategy) holds this machine's `MeasureGate` shared: a
    measurement by another worker waits for it instead of timing it."""
    gate = _gate(cfg)
    if gate is None:
        yield
        return
    try:
        with gate.shared():
            yield
    finally:
        gate.close()


def _config_args(config: dict) -> dict:
    d = {k: v for k, v in config.items() if k in SearchConfig.__dataclass_fields__}
    if d.get("input_shape"):
        d["input_shape"] = tuple(d["input_shape"])
    return d
