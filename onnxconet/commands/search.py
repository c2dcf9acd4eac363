"""`onnxconet search`: model + data + budget -> the best widths, fine-tuned, as a checked ONNX file and a report.

The run, in the order it happens (each step is a library function taking the run context):
    build_context   export, data, teacher, baseline.onnx, baseline latency as deployed, budget   search/context.py
    width_space, cost_model, check_reachable, make_strategy, make_evaluator                      search/setup.py
    strategy.prepare  (dmasking: the supernet)                                                   search/base.py
    Loop.replay / Loop.run  (the trials; history.jsonl, resumable)                                 search/driver.py
    finish          confirm, fine-tune, race, best.onnx, latency as deployed -> SearchResult      search/finish.py
    write_report    result.json, report.md, plots                                                 report.py
"""

from __future__ import annotations

import time
from pathlib import Path

from onnxconet import faults
from onnxconet.errors import Interrupted, LatencyError, OnnxconetError, WriteError
from onnxconet.files import RunLock, remove_partial_writes
from onnxconet.report import write_report
from onnxconet.search.config import SearchConfig
from onnxconet.search.context import Progress, RunContext, build_context, history_header
from onnxconet.search.driver import History, Loop, restore_bank
from onnxconet.search.finish import SearchRun, finish
from onnxconet.search.parallel import check_study, local_workers, search_on_study, where_on_study
from onnxconet.search.results import SearchResult
from onnxconet.search.setup import check_reachable, cost_model, make_evaluator, make_strategy, width_space

__all__ = ["SearchConfig", "run_search"]


def run_search(cfg: SearchConfig, progress: Progress | None = None) -> SearchResult:
    """Run a search end to end and write its directory; returns the result (`to_json()` is result.json).

    Raises:
        OnnxconetError: bad input; another run holds the folder (its pid named).
        WriteError: a run file cannot be written (named, with what to do; --resume continues afterwards).
        Interrupted: Ctrl-C; the message names the last finished trial (the history and checkpoints stay).
        LatencyError: the latency target cannot measure (a --target device gone: the message says where the
            run stopped; --resume continues).
    """
    t_start = time.perf_counter()
    cfg.check()
    if cfg.on_study:
        check_study(cfg)  # the storage opens and --resume agrees with the study, before any training
    try:
        with RunLock(cfg.out):  # one run writes a folder at a time
            if cfg.resume:
                remove_partial_writes(cfg.out)
            with local_workers(cfg) as workers, build_context(cfg, progress) as ctx:
                faults.point("context built")
                run = search(ctx, workers)
                with faults.phase("finish"):
                    result = finish(ctx, run)
            result.seconds = round(time.perf_counter() - t_start, 1)
            with faults.phase("report"):
                write_report(result, cfg.out)
                faults.point("report written")
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg)) from None
    except WriteError as e:  # disk full, read-only: the history and checkpoints written so far stay valid
        raise WriteError(f"{e} and continue with --resume") from None
    except LatencyError as e:
        if not cfg.latency_target:
            raise
        # the device went away (or refused): what finished stays, as after a Ctrl-C
        raise LatencyError(
            f"{e}; the run stopped {_where(cfg)}: continue with --resume once the device answers"
        ) from None
    return result


def search(ctx: RunContext, workers: list = ()) -> SearchRun:
    """Set up the strategy and run (or resume) its trials: in this process, or with --workers/--storage on a
    shared study (search/parallel.py)."""
    if ctx.cfg.on_study:
        return search_on_study(ctx, workers)
    space = width_space(ctx)
    cost = cost_model(ctx, space)
    check_reachable(ctx, space, cost)
    strategy = make_strategy(ctx, space, cost)
    evaluator = make_evaluator(ctx, strategy)
    loop = Loop(
        strategy, evaluator, strategy.objective, ctx.out, ctx.cfg.trials, cost.observe_trial, ctx.progress,
        absorb=ctx.cfg.final_from == "trial",
    )  # fmt: skip
    records = _history(ctx, loop)
    setup = strategy.prepare(ctx, records)
    if setup.bank is not None:
        evaluator.bank = setup.bank
    if setup.resolution is not None:  # the rest of the run works at the searched input resolution
        evaluator.at_resolution(setup.resolution)
    loop.replay(records)
    if records and restore_bank(evaluator.bank, ctx.out, records):
        ctx.stage("weight bank restored")
    ctx.stage(f"searching: {ctx.cfg.trials} trials of {ctx.cfg.strategy}")
    loop.run()
    return SearchRun(loop, setup)


def _where(cfg: SearchConfig) -> str:
    """Where a run stopped: after the history's last trial, or (on a study, whose history.jsonl is written at the
    end) how many of its trials had finished."""
    if cfg.on_study:
        return where_on_study(cfg)
    history = History(Path(cfg.out) / "history.jsonl")
    trials = history.read()[1] if history.exists() else []
    return f"after trial {trials[-1]['trial']}" if trials else "before the first trial finished"


def _interrupted(cfg: SearchConfig) -> str:
    """The line a Ctrl-C ends the run with: where it stopped and how to continue."""
    return f"interrupted {_where(cfg)}; continue with --resume"


def _history(ctx: RunContext, loop: Loop) -> list[dict]:
    """The finished trials of a resumed run (after checking the history is this model's), or [] after writing
    the header of a new one."""
    header, records = loop.history.read() if loop.history.exists() else (None, [])
    if header is None:
        loop.history.append(history_header(ctx))
    elif header.get("fingerprint") != ctx.cg.fingerprint():
        raise OnnxconetError(f"{loop.history.path} belongs to another model (fingerprint); use another --out")
    return records
