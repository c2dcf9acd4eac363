"""Before the first trial: the width space, the cost model (with a latency predictor calibrated on measured
probes), the check that the budget can be met at all, the strategy, and the evaluator its trials run in. Each
step takes the run context (`search.context.RunContext`) and at most one thing more."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from functools import partial
from itertools import islice

import torch
from torch.utils.data import DataLoader

from onnxconet.errors import BudgetError, OnnxconetError
from onnxconet.search.anneal import AnnealStrategy
from onnxconet.search.base import Objective, Strategy
from onnxconet.search.baselines import KnapsackStrategy, L1Strategy, RandomStrategy, ScratchStrategy
from onnxconet.search.calibration import PREDICTOR, calibrated_predictor
from onnxconet.search.cost import CostModel
from onnxconet.search.dmasking import DMaskingConfig, DMaskingStrategy
from onnxconet.search.evaluate import Evaluator
from onnxconet.search.judge import CONFIRM_MARGIN, deciding, fits, room
from onnxconet.search.knapsack import knapsack_widths, taylor_gain, taylor_scores
from onnxconet.search.ranks import Ranks
from onnxconet.search.sensitivity import (
    CURVES,
    PATH,
    LossPath,
    curve_gain,
    cut_loss,
    load_curves,
    loss_curves,
    save_curves,
)  # fmt: skip
from onnxconet.space import WidthSpace
from onnxconet.surgery.inherit import WeightBank
from onnxconet.surgery.onnx import slice_onnx
from onnxconet.surgery.verify import freeze_failing

log = logging.getLogger(__name__)


def width_space(ctx) -> WidthSpace:
    """The searched widths: groups whose pruning breaks the model are frozen first (`surgery.verify`)."""
    cfg = ctx.cfg
    freeze_failing(ctx.prep, ctx.cg.uniform_widths(0.5))
    space = WidthSpace(ctx.cg, min_ratio=cfg.min_ratio, align=cfg.align, depth=cfg.depth)
    if not len(space):
        raise OnnxconetError(
            f"{ctx.prep.loaded.spec}: no prunable group (see onnxconet inspect); nothing to search"
        )
    return space


def cost_model(ctx, space: WidthSpace) -> CostModel:
    """The budgeted quantity's cost of widths; for latency a predictor calibrated on `--probes` measured probes
    (saved in the run directory for --resume and shared with dmasking), so every strategy proposes widths that
    land on the budget as measured."""
    cfg = ctx.cfg
    predictor = None
    if cfg.budget_on == "latency" and cfg.probes > 0:
        predictor = calibrated_predictor(ctx, ctx.cg, space, cfg.probes, ctx.out / PREDICTOR)
    return CostModel(ctx.cg, space, cfg.budget_on, predictor)


def check_reachable(ctx, space: WidthSpace, cost: CostModel) -> None:
    """Refuse a budget that the smallest allowed widths cannot meet, before any training. For latency the
    smallest widths are measured as deployed (`LatencyJudge.deployed`: several alternated process pairs), not
    once in-loop: a single in-loop measurement of a sub-millisecond model refused budgets that the search then
    met with wider widths."""
    cfg, budget = ctx.cfg, ctx.budget.ratio
    smallest = space.smallest()
    how = ""
    if cfg.budget_on == "latency":
        ctx.stage("measuring the smallest allowed widths as deployed: is the budget reachable?")
        rel = ctx.judge.deployed(slice_onnx(ctx.cg, ctx.cg.keep_mask(smallest)))
        ratio = rel.ratio
        how = f" as deployed ({rel.rounds} process pairs: {rel.ratio_p10:.3f}-{rel.ratio_p90:.3f})"
        cost.observe(cost.exact(smallest)[0], ratio, smallest)
    else:
        ratio = cost.predict(smallest)
    optimistic = ratio
    if cfg.budget_on == "latency":
        # refuse only what the measurement's own spread rules out: a sub-millisecond model on a busy machine
        # spreads over +-30 % (CI: 0.63-1.30 around 0.97 for a budget of 0.9 that the search then met)
        optimistic = min(ratio, rel.ratio_p10)
        if optimistic <= budget < ratio:
            ctx.stage(
                f"warning: the smallest allowed widths measure {ratio:.3f}{how}, over the budget {budget:.3f} "
                "but within the measurement's spread; searching anyway (the final file is judged as deployed)"
            )
    if optimistic > budget:
        raise BudgetError(
            f"budget {budget:.3f} is out of reach: the smallest allowed widths (every group at "
            f"{cfg.min_ratio:g} of its channels{', removable branches removed' if cfg.depth else ''}) give a {cfg.budget_on} ratio of {ratio:.3f}{how}; raise "
            f"--budget to at least {ratio * 1.05:.2f} or lower --min-ratio"
        )


# the strategies whose widths are placed on the budget before training (search/baselines.py)
PLACED = {"knapsack": KnapsackStrategy, "l1": L1Strategy, "scratch": ScratchStrategy}


def make_strategy(
    ctx, space: WidthSpace, cost: CostModel, start: dict[int, int] | None = None, joining: bool = False
) -> Strategy:
    """The `--strategy` on the run's budget. `start`: anneal's first widths when already placed. `joining`: a
    worker joining a study (search/parallel.py) measures nothing here: the run's first process placed the start
    (given as `start`) and checked the knapsack's placement."""
    cfg = ctx.cfg
    objective = Objective(ctx.budget.ratio, cfg.penalty)
    if cfg.strategy == "anneal":
        init = start if start is not None else start_widths(ctx, space, cost)
        return AnnealStrategy(space, objective, cost, init, seed=cfg.seed)
    if cfg.strategy == "dmasking":
        return DMaskingStrategy(
            space, objective, cost, DMaskingConfig.from_dict(cfg.dmasking), seed=cfg.seed, trials=cfg.trials,
            epochs_per_trial=cfg.epochs_per_trial,
        )  # fmt: skip
    if cfg.strategy in PLACED:
        cls = PLACED[cfg.strategy]
        if cfg.strategy == "knapsack":
            place = saliency_placer(ctx, space, cost, from_uniform=cfg.start == "uniform")
        else:
            place = cost.uniform
        if joining or cfg.budget_on != "latency":
            return cls(space, objective, cost, seed=cfg.seed, place=place)
        # placed within the budget as deployed, with room for the final check (see `deployed_placement`); placed
        # again in-loop (after a trial measured over) under the fixed confirmation margin
        widths, placement = deployed_placement(ctx, place, cost.predict, ctx.budget.ratio)
        target = ctx.budget.ratio * CONFIRM_MARGIN
        return cls(space, objective, cost, cfg.seed, place, widths, target, placement)
    return RandomStrategy(space, objective, cost, seed=cfg.seed)


def start_widths(ctx, space: WidthSpace, cost: CostModel, tries: int = 3) -> dict[int, int]:
    """anneal's first widths on the budget: uniform (one factor for every group) or by latency saliency. With a
    latency budget the start is measured (in-loop) before any training and placed again with the corrected cost
    model while it measures over the budget: on Fashion-MNIST the knapsack start predicted at 0.300 measured 0.351
    and its trial was wasted."""
    if ctx.cfg.start == "knapsack":
        place = saliency_placer(ctx, space, cost)
    else:
        place = cost.uniform
    return measured_placement(ctx, place, cost, tries)


def measured_placement(ctx, place, cost: CostModel, tries: int) -> dict[int, int]:
    """`place(budget)`, measured in-loop before any training and placed again on the refitted cost model while it
    measures over the budget (at most `tries` measurements; without a latency budget, placed once). The knapsack
    exploits the predictor's errors: on Fashion-MNIST it filled the third stage, predicted cheap, and the three
    trials of one run measured 0.313, 0.307, 0.303 at a 0.3 budget; measurements are cheap, trials are not."""
    budget = ctx.budget.ratio
    widths = place(budget)
    if ctx.cfg.budget_on != "latency":
        return widths
    for _ in range(tries):
        ratio, _ms = ctx.judge.measure(slice_onnx(ctx.cg, ctx.cg.keep_mask(widths)))
        cost.observe(cost.exact(widths)[0], ratio, widths)
        if ratio <= budget:
            break
        log.info("the start measured %.3f over the budget %.3f; placing it again", ratio, budget)
        widths = place(budget)
    return widths


# the steering's window under the limit: 3 % left ~0.006 of a 0.3 budget unused on Fashion-MNIST, and a deployed
# measurement of ResNet-20 costs ~10 s
PLACEMENT_WINDOW = 0.01
# the steering's deployed measurements at most (~10-40 s each, against ~55 s per epoch of ResNet-20 on 20k images):
# at 5, seed 0 at 0.5 on Fashion-MNIST bracketed the budget between targets 0.512 (measured 0.444) and 0.527
# (0.499, too wide to fit) with its last two, and kept 0.44
PLACEMENT_TRIES = 8
# the room (`judge.room`, as a share of the budget) over which the placement warns that the deployment's spread
# decides much of it: quiet 1-thread measurements of ResNet-20 leave 2-5 % at 0.3; the phase-flipping VM of
# docs/measurements.md ("The room") 10-25 %
NOISY_ROOM = 0.1


def deployed_placement(
    ctx, place, predict, budget: float, tries: int = PLACEMENT_TRIES, tolerance: float = PLACEMENT_WINDOW
) -> tuple[dict[int, int], list[dict]]:
    """`place(t)`, its own target t steered until the widths measure *as deployed* (each file alone in its own
    processes: what decides what ships) within `budget` with room for measuring them again (`judge.fits`) and
    within `tolerance` under that limit: secant steps (t scaled by aim / measured, the aim inside that window,
    which the last measurement's spread sets; one too wide to steer by gets more pairs) until one placement fit
    and one did not, then bisection between them (the response jumps where the uniform grid does: on
    Fashion-MNIST at 0.5, secant steps alone went 0.43, 0.63, 0.35, 0.59, 0.37). At most `tries` measurements;
    the widest that fit (placed at the highest target) is kept (else the lowest measured). The cost model is left
    as calibrated: steering the placer's own target does not compound with a refit (placed again on a model
    refitted with one deployed figure, the knapsack shrank to 0.37 of 0.5). Returns (widths, [{"target",
    "ratio", "fits", "limit" (the budget less the room), "pairs" (the process pairs the narrowing took),
    "widths"} per measurement])."""
    t, tried, under, over = budget * (1 - tolerance / 2), [], None, None
    for _ in range(3 * tries):  # (placements already measured cost nothing)
        widths = place(t)
        known = next((x for x in tried if x["widths"] == widths), None)
        if known is None:
            if len(tried) >= tries:
                break
            stats = _measured(ctx, widths, budget)
            x = {"target": t, "ratio": stats.ratio, "fits": fits(stats, budget), "widths": widths}
            tried.append(x | {"limit": budget - room(stats), "pairs": stats.rounds})
            log.info("placement at %.3f measured %.3f as deployed (budget %.3f)", t, stats.ratio, budget)
        x = known or tried[-1]
        ratio, ok = x["ratio"], x["fits"]
        # the window: within `tolerance` under the limit this measurement's spread leaves under the budget
        aim = x["limit"] * (1 - tolerance / 2)
        if ok and ratio >= x["limit"] * (1 - tolerance):
            break
        if ok:
            under = t if under is None else max(under, t)
        else:
            over = t if over is None else min(over, t)
        if under is not None and over is not None:
            if over - under < 1e-3:
                break
            t = (under + over) / 2
        elif known is not None:  # the same widths again, nothing bracketed: the grid gets no closer
            break
        elif ok:  # from the target: the placement may sit well under it (a coarse placer) and
            t = t * aim / ratio  # its own prediction, scaled, stepped back onto the same widths
        else:
            t = predict(widths) * aim / ratio
    # the widest that fit is the one placed at the highest target (the placers are monotone in their target): its
    # measured ratio would let the noise choose (on 2026-12-05's VM, whose pairs spread 0.17-0.29 for one file, the
    # steering kept a placement measured at 0.285 over a wider one measured at 0.256)
    within = [x for x in tried if x["fits"]]
    chosen = max(within, key=lambda x: x["target"]) if within else min(tried, key=lambda x: x["ratio"])
    _warn_noisy(tried, budget)
    record = [
        {
            "target": round(x["target"], 4),
            "ratio": round(x["ratio"], 4),
            "fits": x["fits"],
            "limit": round(x["limit"], 4),
            "pairs": x["pairs"],
            "widths": {str(k): v for k, v in x["widths"].items()},
        }
        for x in tried
    ]
    return chosen["widths"], record


def _warn_noisy(tried: list[dict], budget: float) -> None:
    """A warning when even the narrowest room the placements' measurements left is over `NOISY_ROOM` of the
    budget: the deployment's own spread, not the widths, then decides much of where the placement lands."""
    least = min(budget - x["limit"] for x in tried)
    if least > NOISY_ROOM * budget:
        log.warning(
            "this deployment's latency spreads widely between measurements of one file: a placement must measure "
            "under %.3f to be sure of the budget %.3f (a room of %.0f %%); measure on a quieter machine or more "
            "threads for a budget this close", budget - least, budget, 100 * least / budget,
        )  # fmt: skip


def _measured(ctx, widths: dict[int, int], budget: float):
    """`widths` as deployed, measured until the room they leave is narrow enough to decide by (`deciding`)."""
    return deciding(ctx.judge, slice_onnx(ctx.cg, ctx.cg.keep_mask(widths)), budget)


def saliency_placer(ctx, space: WidthSpace, cost: CostModel, from_uniform: bool = False):
    """`budget -> widths` by latency saliency: the teacher's importance (`--importance`: Taylor on validation
    batches, or each group's measured validation loss curve) per latency predicted by `cost` at the time of the
    call (so a refitted cost model places them again). `from_uniform`: the fill starts from the uniform widths on
    the budget (every group keeps what l1 gives it; the budget the uniform grid leaves goes where saliency per
    latency is highest) instead of every group's minimum."""
    if ctx.cfg.importance == "path":
        return loss_path(ctx, space, cost.predict)
    fill = partial(knapsack_widths, ctx.cg, space, importance(ctx, space), cost.predict)
    if not from_uniform:
        return fill
    return lambda budget: fill(budget, start=cost.uniform(budget))


# the loss curves read at most this many validation images per cut (the same ones for every cut: a paired
# comparison); ResNet-20 on Fashion-MNIST (117 cuts with --depth --align 4) took ~5 min on 2 cores
CURVE_IMAGES = 2048
# --importance path: each step saves at least this share of the predicted cost where it stands (~25 steps from
# the whole ResNet-20 to 0.3, ~12 cuts measured per step)
PATH_STEP = 0.05


def importance(ctx, space: WidthSpace):
    """The knapsack's gain: `taylor_gain` of the Taylor scores, or `sensitivity.curve_gain` of the measured loss
    curves."""
    # Held-out data, in a fixed order (no shared RNG): a teacher that fits its training set has a near-zero
    # training loss (0.0055 per batch on Fashion-MNIST's 20k subset), so gradients there rest on a few samples;
    # on the validation split the loss is ~45x larger and the per-group sums 7-15x (docs/measurements.md,
    # "Depth at 0.5").
    if ctx.cfg.importance == "taylor":
        ctx.stage("scoring channels by Taylor importance (validation split) for the latency-saliency widths")
        val = DataLoader(ctx.loaders.val.dataset, batch_size=ctx.cfg.batch_size)
        return taylor_gain(ctx.cg, space, taylor_scores(ctx.cg, ctx.teacher, val))
    path = ctx.out / CURVES
    curves = load_curves(path, ctx.cg, space) if ctx.cfg.resume else None
    if curves is not None:
        ctx.stage(f"loss curves restored from {path}")
        return curve_gain(curves)
    cuts = sum(len(g.options()) for g in space)
    ctx.stage(f"measuring each group's validation loss at each of its widths ({cuts} cuts of the original)")
    loss = cut_loss(ctx.cg, WeightBank(ctx.teacher), *_loss_batches(ctx), device=ctx.cfg.device)
    curves = loss_curves(space, loss, progress=lambda done, total: ctx.emit("cuts", done=done, total=total))
    save_curves(path, curves, ctx.cg)
    return curve_gain(curves)


def loss_batches(train, val, batch_size: int, seed: int) -> tuple[list, list]:
    """The measured losses' data: 10 batches of the `train` dataset shuffled by `seed` re-estimate BatchNorm for
    every cut, and the `val` dataset's first CURVE_IMAGES images score it: the same for every cut (paired).
    tools/trial_horizon.py measures a cut on the same batches."""
    shuffled = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    scored = DataLoader(val, batch_size=batch_size)
    return list(islice(shuffled, 10)), list(islice(scored, max(1, CURVE_IMAGES // batch_size)))


def _loss_batches(ctx) -> tuple[list, list]:
    return loss_batches(ctx.loaders.train.dataset, ctx.loaders.val.dataset, ctx.cfg.batch_size, ctx.cfg.seed)


def loss_path(ctx, space: WidthSpace, predict) -> Callable[[float], dict[int, int]]:
    """`--importance path`'s placer: `sensitivity.LossPath` on the teacher, saved to the run directory after every
    step (restored on --resume when it is of this graph and space)."""
    file = ctx.out / PATH
    points = LossPath.saved_points(file, ctx.cg, space, PATH_STEP) if ctx.cfg.resume else None
    ctx.stage(
        f"loss path restored from {file} ({len(points) - 1} steps)" if points
        else "walking down from the whole network, one measured cut per step (--importance path)"
    )  # fmt: skip

    def stepped(i: int, cost: float) -> None:
        walk.save(file, ctx.cg)
        ctx.emit("path", step=i, predicted=cost, evaluations=walk.evaluations)

    loss = cut_loss(ctx.cg, WeightBank(ctx.teacher), *_loss_batches(ctx), device=ctx.cfg.device)
    walk = LossPath(space, loss, predict, step=PATH_STEP, points=points, progress=stepped)
    walk.save(file, ctx.cg)
    return walk.place


def make_evaluator(ctx, strategy: Strategy) -> Evaluator:
    """The evaluator the trials run in. With --final-from original the search only ranks widths, so trials must
    be comparable: each is cut from the original (the loop absorbs nothing; no trial inherits another's
    training) and trains on the same batches."""
    cfg = ctx.cfg
    bank = reinit_bank(ctx.teacher, cfg.seed) if strategy.reinit else WeightBank(ctx.teacher)
    return Evaluator(
        cg=ctx.cg,
        bank=bank,
        teacher=ctx.teacher,
        train_loader=ctx.loaders.train,
        val_loader=ctx.loaders.val,
        train_cfg=ctx.train,
        judge=ctx.judge if cfg.budget_on == "latency" or cfg.latency_seconds > 0 else None,
        on=cfg.budget_on,
        device=cfg.device,
        metric="qc" if cfg.strategy == "anneal" else "none",
        progress=ctx.train_progress,
        as_deployed=strategy.as_deployed(),
        same_batches=cfg.final_from == "original",
        ranks=Ranks(cfg.nproc_per_trial, ctx.prep.loaded, cfg.torch_threads)
        if cfg.nproc_per_trial > 1
        else None,
    )


def reinit_bank(teacher: torch.nn.Module, seed: int) -> WeightBank:
    """The teacher's architecture with fresh weights (seeded): what `scratch` trains."""
    fresh = copy.deepcopy(teacher)
    torch.manual_seed(seed)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and m is not fresh:
            m.reset_parameters()
    return WeightBank(fresh)
