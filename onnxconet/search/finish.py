"""After the last trial: choose the trial to ship (re-measured as deployed), fine-tune it, race it against the
start when the search only ranked widths, write best.onnx (checked against torch) and measure it as deployed.
`finish(ctx, run)` returns the typed `SearchResult`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from onnxconet import faults
from onnxconet.errors import OnnxconetError, SurgeryError
from onnxconet.files import atomic_write
from onnxconet.graph.groups import ChannelGraph
from onnxconet.graph.stats import count_flops, count_params
from onnxconet.provenance import code_versions
from onnxconet.search.base import Setup, Trial, TrialState
from onnxconet.search.config import config_json
from onnxconet.search.driver import Loop, keep_of, load_checkpoint
from onnxconet.search.evaluate import reseed_loader
from onnxconet.search.judge import deciding, fits
from onnxconet.search.pareto import pareto_front
from onnxconet.search.race import correct_mask, mcnemar
from onnxconet.search.resolution import ResizedLoader
from onnxconet.search.results import BestRecord, DeployedLatency, SearchResult
from onnxconet.space import save_widths
from onnxconet.surgery.inherit import WeightBank
from onnxconet.surgery.onnx import check_onnx, slice_onnx
from onnxconet.surgery.parity import max_rel_diff, onnx_outputs, onnx_with_weights, torch_outputs
from onnxconet.train.loop import evaluate, fit, recalibrate_bn

log = logging.getLogger(__name__)
# best.onnx against the fine-tuned torch model, over the largest |output|: float32 rounding is ~1e-6 here
PARITY_TOL = 1e-3


@dataclass
class SearchRun:
    """The search phase's end state: the loop (records, best, strategy, evaluator) and the strategy's setup.
    `cg` and the loaders are those the trials ran at (another input resolution under dmasking's spatial
    search)."""

    loop: Loop
    setup: Setup
    study: dict | None = None  # a shared study's accounting of its trials (search/study.py)

    @property
    def cg(self) -> ChannelGraph:
        return self.loop.evaluator.cg

    def trials(self) -> list[Trial]:
        return [Trial.from_json(r) for r in self.loop.records]


def finish(ctx, run: SearchRun) -> SearchResult:
    """Choose, fine-tune, race, export and measure the best; the result of the run (without its wall time)."""
    best, confirmed = confirm_best(ctx, run)
    best = best or _closest(ctx, run)
    faults.point("chosen")
    keep, model = final_model(ctx, run, best)
    faults.point("fine-tuned")
    best, keep, model, race = _race(ctx, run, (best, keep, model))
    val = run.loop.evaluator.val_loader
    val_acc = evaluate(model, val, device="cpu", max_batches=ctx.cfg.max_batches)["accuracy"]
    test = _test_loader(ctx, run)
    test_acc = evaluate(model, test, device="cpu")["accuracy"] if test is not None else None
    record = write_best(ctx, run, best, keep, model)
    faults.point("best.onnx written")
    record.accuracy, record.test_accuracy, record.search_accuracy = val_acc, test_acc, best.accuracy
    record.confirm_ratios, record.race = confirmed or None, race
    record.shipped = shipped(run, best)
    return _result(ctx, run, record)


def shipped(run: SearchRun, best: Trial) -> str:
    """ "start" when the shipped widths are those the strategy started from (or it only proposes its start:
    the uniform baselines), else "search"."""
    strategy = run.loop.strategy
    return "start" if not strategy.searches or best.widths == strategy.anchor() else "search"


def _closest(ctx, run: SearchRun) -> Trial:
    trials = run.trials()
    done = [t for t in trials if t.state is TrialState.COMPLETE]
    if not done:
        raise OnnxconetError(
            f"every trial failed (see {ctx.out / 'history.jsonl'}); the first error: "
            f"{trials[0].error if trials else 'none'}"
        )
    best = min(done, key=lambda t: t.ratio)
    log.warning(
        "no trial met the budget; finishing the one closest to it (trial %d, ratio %.3f)",
        best.number,
        best.ratio,
    )
    return best


def _test_loader(ctx, run: SearchRun):
    res = run.setup.resolution
    test = ctx.loaders.test
    return ResizedLoader(test, res.size) if res is not None and test is not None else test


def remeasure(ctx, run: SearchRun, trial: Trial):
    """`trial`'s latency relative to the baseline, re-measured as deployed until the room it leaves is narrow
    enough to decide by (`deciding`)."""
    keep = run.cg.keep_mask(trial.widths, run.loop.evaluator.bank.scores(run.cg))
    return deciding(ctx.judge, slice_onnx(run.cg, keep), ctx.budget.ratio)


def confirm_best(ctx, run: SearchRun, top: int = 3) -> tuple[Trial | None, dict[int, float]]:
    """The trial to finish: with a latency budget, the most accurate feasible trials (by the objective, plus the
    one with the most headroom) are re-measured as deployed and the first that `fits` (within the budget with
    the room its CI leaves for the final check) wins; else the most accurate within the budget; else the lowest.
    One short measurement per trial must not decide what ships: the default search on a loaded 2-core machine
    picked a trial measured at 0.464 that re-measured at 0.512 (budget 0.5), and on a quiet one a trial confirmed
    at 0.453 measured 0.502 in the final check. The fixed 3 % margin this replaced threw away trials a narrow CI
    placed safely under the budget.

    Returns (trial or None when none was feasible, {trial number: re-measured ratio}).
    """
    loop, budget = run.loop, ctx.budget.ratio
    best = loop.best
    if best is None or ctx.budget.on != "latency" or loop.evaluator.judge is None:
        return best, {}
    feasible = [t for t in run.trials() if loop.objective.feasible(t)]
    ranked = sorted(feasible, key=loop.objective, reverse=True)[:top]
    roomiest = min(feasible, key=lambda t: t.ratio)
    if roomiest not in ranked:
        ranked.append(roomiest)
    ctx.stage(f"re-measuring the {len(ranked)} best feasible trials as deployed before choosing")
    checks: dict[int, float] = {}
    for t in ranked:
        stats = remeasure(ctx, run, t)
        checks[t.number] = round(stats.ratio, 4)
        if fits(stats, budget):
            if t.number != best.number:
                log.info(
                    "trial %d re-measured near or over the budget; finishing trial %d", best.number, t.number
                )
            return t, checks
    within = [t for t in ranked if checks[t.number] <= budget]
    if within:
        return within[0], checks
    choice = min(ranked, key=lambda t: checks[t.number])
    log.warning(
        "no trial stayed within the budget when re-measured; finishing the lowest (trial %d)", choice.number
    )
    return choice, checks


def race_anchor(ctx, run: SearchRun, best: Trial) -> tuple[Trial | None, float | None]:
    """The trial holding the widths the strategy started from, when the final race applies: the search only
    ranks widths (--final-from original), the strategy has a start (anneal: the uniform widths on the budget),
    the search finished on other widths, and the start met the budget when measured and again when re-measured
    as deployed. Returns (trial or None, re-measured ratio or None when nothing was re-measured)."""
    loop = run.loop
    start = loop.strategy.anchor()
    if ctx.cfg.final_from != "original" or start is None or best.widths == start:
        return None, None
    anchor = next((t for t in run.trials() if t.widths == start and loop.objective.feasible(t)), None)
    if anchor is None or ctx.budget.on != "latency":
        return anchor, None
    ratio = remeasure(ctx, run, anchor).ratio
    return (anchor if ratio <= loop.objective.budget else None), ratio


def _race(ctx, run: SearchRun, challenger: tuple) -> tuple:
    """(trial, keep, model, race record or None): the challenger, unless the start it is raced against wins
    (search/race.py: the searched widths must beat the start significantly)."""
    best, keep, model = challenger
    anchor, anchor_ratio = race_anchor(ctx, run, best)
    if anchor is None:
        return best, keep, model, None
    anchor_keep, anchor_model = final_model(ctx, run, anchor)
    ctx.stage(f"racing trial {best.number} against the start (trial {anchor.number})")
    val = run.loop.evaluator.val_loader
    outcome = mcnemar(correct_mask(anchor_model, val), correct_mask(model, val))
    race = {"anchor": anchor.number, "challenger": best.number, **outcome.to_json()}
    if anchor_ratio is not None:
        race["anchor_confirm_ratio"] = round(anchor_ratio, 4)
    if outcome.challenger_wins:
        return best, keep, model, race
    return anchor, anchor_keep, anchor_model, race


def final_model(ctx, run: SearchRun, trial: Trial) -> tuple[np.ndarray, nn.Module]:
    """`trial`'s widths, cut (from its checkpoint with --final-from trial, else from the original) and fine-tuned
    for --final-epochs with distillation. Returns (keep mask, model on the CPU in eval mode)."""
    cfg, ev, cg = ctx.cfg, run.loop.evaluator, run.cg
    train = ev.train_loader
    ctx.stage(f"fine-tuning trial {trial.number} for {cfg.final_epochs} epochs")
    # from a seeded start: with --final-from original every strategy's widths get the same final training, batch
    # for batch; and a resumed run fine-tunes on the batches an uninterrupted one would have
    reseed_loader(train, ctx.train.seed)
    ckpt = load_checkpoint(ctx.out / "best_candidate.pt") if cfg.final_from == "trial" else None
    keep = keep_of(ckpt, trial)
    if keep is None:
        bank = ev.bank
        if cfg.final_from == "original" and not run.loop.strategy.reinit:
            bank = WeightBank(ctx.teacher)  # a re-initializing strategy's bank is still its starting point
        keep = cg.keep_mask(trial.widths, bank.scores(cg))
        model = bank.cut(cg.param_slices(keep))
        recalibrate_bn(model, train, batches=10, device=cfg.device)
    else:
        model = ev.bank.cut(cg.param_slices(keep))
        model.load_state_dict(ckpt["state"])
    if cfg.final_epochs > 0:
        tcfg = replace(ctx.train, epochs=cfg.final_epochs)
        if ev.ranks is not None:
            ev.ranks.fit(model, cg.param_slices(keep), train, tcfg, ctx.teacher, cfg.device)
        else:
            fit(model, train, tcfg, teacher=ctx.teacher, device=cfg.device, progress=ctx.train_progress)
    return keep, model.cpu().eval()


def write_best(ctx, run: SearchRun, trial: Trial, keep: np.ndarray, model: nn.Module) -> BestRecord:
    """best.onnx (the graph at the best widths with the fine-tuned weights, checked against torch) and
    best_widths.json, with the latency as deployed in the record and in the file's metadata.

    Raises:
        SurgeryError: best.onnx's outputs differ from the fine-tuned torch model's by more than `PARITY_TOL` of
            the output scale; nothing is written (the history and checkpoints stay for --resume).
    """
    cg = run.cg
    ctx.stage("writing best.onnx, checking it against torch, measuring it as deployed")
    proto = onnx_with_weights(slice_onnx(cg, keep), model.state_dict())
    check_onnx(proto)
    shape = run.setup.resolution.input_shape(_base_shape(ctx)) if run.setup.resolution else _base_shape(ctx)
    x = np.random.default_rng(ctx.cfg.seed).standard_normal(shape).astype(np.float32)
    abs_diff, rel_diff = max_rel_diff(onnx_outputs(proto.SerializeToString(), x), torch_outputs(model, x))
    if not rel_diff <= PARITY_TOL:
        raise SurgeryError(
            f"best.onnx would differ from the fine-tuned torch model by {abs_diff:.3g} ({rel_diff:.2%} of the "
            f"output scale, over {PARITY_TOL:.1%}); not written. Report it with the model; the history and "
            f"{ctx.out / 'best_candidate.pt'} are kept"
        )
    widths = cg.widths_of(keep)
    meta = {
        "onnxconet.widths": json.dumps({str(k): v for k, v in widths.items()}),
        "onnxconet.fingerprint": cg.fingerprint(),
        "onnxconet.model": ctx.prep.loaded.spec,
        **({"onnxconet.resolution": str(run.setup.resolution.size)} if run.setup.resolution else {}),
    }
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    path = ctx.out / "best.onnx"
    atomic_write(path, proto.SerializeToString())
    save_widths(ctx.out / "best_widths.json", widths, cg, ctx.prep.loaded.spec)
    faults.point("best.onnx checked")
    latency = deployed_latency(ctx, path)
    for k, v in {
        "onnxconet.latency_ratio": f"{latency.ratio:.4f}",
        "onnxconet.latency_ms": f"{latency.by_threads[str(latency.threads)]['best_ms']:.4f}",
        "onnxconet.baseline_latency_ms": f"{latency.by_threads[str(latency.threads)]['baseline_ms']:.4f}",
        "onnxconet.latency_measured": latency.how,
        **{
            f"onnxconet.provenance.{name}": str(v)
            for name, v in provenance(latency, ctx.judge.target).items()
            if v is not None
        },
    }.items():
        proto.metadata_props.add(key=k, value=v)
    atomic_write(path, proto.SerializeToString())  # the same graph, now with its latency as deployed
    return _record(ctx, run, trial, keep, latency, (abs_diff, rel_diff))


def provenance(latency: DeployedLatency, target) -> dict:
    """Which code produced the result (`provenance.code_versions`) and where its latency was measured: the
    execution provider onnxruntime really used, the intra-op threads, the device and its CPU."""
    ident = target.on().identity()
    return {
        **code_versions(), "provider": latency.provider, "threads": latency.threads, "cpu": ident["cpu"],
        "device": target.device_name, "device_host": ident["host"],
    }  # fmt: skip


def _base_shape(ctx) -> tuple[int, ...]:
    return tuple(ctx.prep.loaded.input_shape)


def _record(
    ctx, run: SearchRun, trial: Trial, keep: np.ndarray, latency: DeployedLatency, diffs
) -> BestRecord:
    cg, base_cg = run.cg, ctx.cg
    flops, params = count_flops(cg, keep), count_params(cg, keep)
    flops_ratio, params_ratio = flops / count_flops(base_cg), params / count_params(base_cg)
    at = latency.by_threads[str(latency.threads)]
    ratio_now = {"latency": latency.ratio, "flops": flops_ratio, "params": params_ratio}[ctx.budget.on]
    return BestRecord(
        trial=trial.number, widths={str(k): v for k, v in cg.widths_of(keep).items()},
        search_accuracy=trial.accuracy, latency_ms=at["best_ms"], latency_ratio=latency.ratio,
        speedup=1.0 / latency.ratio, params=params, flops=flops, flops_ratio=flops_ratio,
        params_ratio=params_ratio, budget_met=bool(ratio_now <= ctx.budget.ratio), max_abs_diff=diffs[0],
        max_rel_diff=diffs[1], onnx=str(ctx.out / "best.onnx"), latency=latency,
    )  # fmt: skip


def deployed_latency(ctx, best_path) -> DeployedLatency:
    """best.onnx against baseline.onnx as deployed, at the deployment's thread count and, when that is not 1, at
    1 thread: on small models the thread count decides more than the widths (measured: a 0.3 ms model ran 0.13 ms
    with 2 threads and 0.07 ms with 1). The verdict takes twice the pairs of the search's own checks: at 0.3 ms one
    process differs from the next by ~13 %, and on Fashion-MNIST a file the 8-pair verdict put at 0.304 (budget
    0.3) measured 0.280-0.289 in five 16-pair measurements (docs/measurements.md)."""
    judge = ctx.judge
    target = judge.target
    threads = target.resolved_threads
    ctx.stage(f"measuring best.onnx against the baseline as deployed ({target.describe()})")
    rel = judge.deployed(str(best_path), pairs=2 * judge.pairs)
    latency = DeployedLatency(
        method=rel.method,
        provider=rel.candidate.provider,
        how=(
            f"as deployed: each model alone in a fresh process ({target.describe()}; {rel.candidate.provider}, "
            f"onnxruntime {rel.candidate.onnxruntime}), {rel.rounds} process pairs alternated, ratio of the "
            "medians of the per-process medians"
        ),
        ratio=rel.ratio, ratio_p10=rel.ratio_p10, ratio_p90=rel.ratio_p90, ratio_ci=rel.ratio_ci, ratios=rel.ratios,
        load=rel.load,
        disturbed=rel.disturbed, threads=threads, by_threads={str(threads): _at_threads(rel)},
    )  # fmt: skip
    if threads != 1:
        ctx.stage("measuring best.onnx and the baseline at 1 thread")
        one = judge.deployed(str(best_path), threads=1)
        latency.by_threads["1"] = _at_threads(one)
        # 5 %: a smaller difference is within what two deployed measurements of one file differ by
        latency.fewer_threads_faster = bool(one.candidate.median_ms < 0.95 * rel.candidate.median_ms)
    return latency


def _at_threads(rel) -> dict:
    return {
        "best_ms": rel.candidate.median_ms,
        "baseline_ms": rel.reference.median_ms,
        "ratio": rel.ratio,
        "disturbed": rel.disturbed,
    }


def _result(ctx, run: SearchRun, best: BestRecord) -> SearchResult:
    cg, res, on = ctx.cg, run.setup.resolution, ctx.budget.on
    baseline = replace(
        ctx.baseline,
        latency_ms=best.latency.by_threads[str(best.latency.threads)]["baseline_ms"],
        params=count_params(cg),
        flops=count_flops(cg),
        latency_drift=ctx.judge.drift(),
        input_shape=list(_base_shape(ctx)) if res is not None else None,
    )
    records = [dict(r) for r in run.loop.records]
    key = {"latency": "latency_ratio", "flops": "flops_ratio", "params": "params_ratio"}[on]
    target = ctx.judge.target
    ident = target.on().identity()  # the device the latency was measured on (this machine or --target's)
    return SearchResult(
        config={**config_json(ctx.cfg), "strategy": ctx.cfg.strategy},
        baseline=baseline,
        budget=ctx.budget,
        best=best,
        trials=records,
        pareto=[records[i]["trial"] for i in pareto_front(records, x=key)],
        groups=[{"id": g.id, "channels": g.channels, "modules": g.modules} for g in cg.prunable],
        provider=best.latency.provider,
        onnxruntime=ident["onnxruntime"],
        host=f"{ident['host']} ({ident['cpu']}, {target.resolved_threads} threads)",
        deployment=target.describe(),
        provenance=provenance(best.latency, target),
        resolution=res.size if res is not None else None,
        input_shape=list(res.input_shape(_base_shape(ctx))) if res is not None else None,
        extra={**run.loop.strategy.summary(), **({"study": run.study} if run.study else {})},
    )
