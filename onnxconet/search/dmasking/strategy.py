"""`DMaskingStrategy`: FBNetV2's DMaskingNAS as a strategy of the search run (package docstring).

The strategy only wires the two phases to the run: `prepare` trains the supernet (`supernet.py`) and returns
the bank the derived trials are cut from; `ask` hands out the derivation's next candidate (`derive.py`);
`tell` records what the run should keep with each trial. It never touches the run's evaluator.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from onnxconet.errors import OnnxconetError
from onnxconet.search.base import Objective, Setup, Strategy, Trial, TrialState
from onnxconet.search.cost import CostModel
from onnxconet.search.dmasking.config import DMaskingConfig
from onnxconet.search.dmasking.cost import DMaskingCost, latency_predictor
from onnxconet.search.dmasking.derive import CHECKS, Checks, Derivation, judged
from onnxconet.search.dmasking.supernet import (
    RankedBank,
    SupernetJob,
    SupernetResult,
    argmax_last,
    train_supernet,
)
from onnxconet.search.masks import depth_options, width_grid, width_options
from onnxconet.search.resolution import bind_costs
from onnxconet.space import WidthSpace


class DMaskingStrategy(Strategy):
    """FBNetV2's DMaskingNAS (package docstring). The run calls `prepare(ctx, records)` before the first
    ask."""

    name = "dmasking"
    absorb = False  # every derived candidate is cut from the same supernet weights

    def __init__(
        self,
        space: WidthSpace,
        objective: Objective,
        cost: CostModel,
        config: DMaskingConfig | None = None,
        *,
        seed: int = 0,
        trials: int = 1,
        epochs_per_trial: int = 1,
    ) -> None:
        super().__init__(space, objective, seed)
        self.cost = cost  # the run's (its calibrated latency predictor is reused)
        self.cg = cost.cg  # the bound resolution's graph once prepared
        self.on = cost.on
        self.config = config or DMaskingConfig()
        self.epochs = self.config.epochs or max(self.config.min_epochs, trials * epochs_per_trial)
        align = self.config.align or 1  # unset: the space's own steps, which follow the run's --align
        self.options = width_options(self.cg, space, self.config.options, align)
        self.grid = {g.id: width_grid(self.cg, space, g.id, align) for g in space}
        self.rng = np.random.default_rng(seed)
        self.dm_cost = DMaskingCost(self.cg, self.on, objective.budget, self.config)
        self.supernet: SupernetResult | None = None
        self.supernet_summary: dict[str, Any] = {}
        self.derivation: Derivation | None = None
        self.asked: list[dict[int, int]] = []
        self.best_objective = -math.inf
        self.told = 0
        self._pending: dict[str, Any] = {}

    # ---- before the first trial
    def prepare(self, ctx, records: list[dict]) -> Setup:
        """Bind the searched resolutions' costs, get the latency predictor, train the supernet (resumed
        from its checkpoint), bind the resolution and start the derivation. Returns the bank the trials are
        cut from (the supernet's weights, or the original's with inherit="original") and the bound
        resolution."""
        if ctx.resolutions:
            probes = max(4, (ctx.cfg.probes or self.config.probes) // 2)
            bind_costs(ctx, ctx.resolutions, self.space, self.cost.predictor, probes)
            self.dm_cost.search_resolutions(ctx.resolutions)
        facts: dict[str, Any] = {}
        if self.on == "latency" and self.dm_cost.predictor is None and not self.dm_cost.resolutions:
            self.dm_cost.predictor = self.cost.predictor  # the run's calibrated predictor when it has one
            if self.dm_cost.predictor is None:
                self.dm_cost.predictor, facts = latency_predictor(
                    ctx, self.cg, self.space, self.config.probes
                )
        self.options, no_zero = depth_options(self.cg, ctx.teacher, self.options)
        for gid, why in no_zero.items():
            ctx.stage(f"dmasking: group {gid} keeps its branch (width 0 not searched): {why}")
            self.grid[gid] = [w for w in self.grid[gid] if w > 0]
        job = SupernetJob(self.cg, self.options, self.epochs, self.seed, self.config, self.dm_cost)
        result = train_supernet(ctx, job)
        self.supernet_summary = {**facts, **result.summary}
        resolution = self._bind_resolution(ctx, result, records)
        source = result.model if self.config.inherit == "supernet" else ctx.teacher
        bank = RankedBank(copy.deepcopy(source).cpu(), result.scores)
        scores = bank.scores(self.cg)
        self.derive_from(result, Checks(judged(ctx.judge, self.cg, scores), ctx.out / CHECKS, ctx.cfg.resume))
        return Setup(bank=bank, resolution=resolution)

    def _bind_resolution(self, ctx, result: SupernetResult, records: list[dict]):
        """The searched resolution the derived candidates are priced, cut and measured at: the one a resumed
        run's trials were recorded at, else the supernet's argmax (ties: the larger). None without."""
        sizes = self.dm_cost.sizes()
        if not sizes:
            return None
        recorded = next((r["resolution"] for r in records if r.get("resolution")), None)
        res = self.dm_cost.bind(recorded if recorded is not None else sizes[argmax_last(result.res_logits)])
        self.cg = res.cg
        self.supernet_summary["resolution"] = res.size
        ctx.stage(f"input resolution: {res.size} (of {sizes})")
        return res

    def derive_from(self, result: SupernetResult, checks: Checks | None = None) -> None:
        """Phase 2 from a trained supernet (`prepare` calls it; tests hand it logits directly)."""
        self.supernet = result
        self.derivation = Derivation(
            result, self.space, self.options, self.grid, self.dm_cost, self.rng, checks
        )

    # ---- the trials
    def ask(self) -> dict[int, int] | None:
        if self.derivation is None:
            raise OnnxconetError("DMaskingStrategy.prepare(ctx, records) must be called before ask()")
        widths, self._pending = self.derivation.candidate(len(self.asked), self.asked)
        if widths is None:  # every draw repeats a configuration already trained: stop the trials here
            self.supernet_summary["exhausted_after"] = len(self.asked)
            return None
        self.asked.append(widths)
        return widths

    def tell(self, trial: Trial) -> dict:
        pending = self._pending or {}
        self._pending = {}
        self.told += 1
        if (
            self.on == "latency"
            and trial.state is TrialState.COMPLETE
            and trial.latency_ratio
            and pending.get("predicted_raw")
        ):
            self.dm_cost.correction.add(trial.latency_ratio, pending["predicted_raw"])
        j = self.objective(trial)
        better = trial.state is TrialState.COMPLETE and j > self.best_objective
        if better:
            self.best_objective = j
        facts = {
            "accepted": bool(better),
            "objective": None if math.isinf(j) else j,
            **{k: v for k, v in pending.items() if k != "predicted_raw"},
        }
        if self.dm_cost.resolution is not None:
            facts["resolution"] = self.dm_cost.resolution.size
        if self.told == 1:
            facts["supernet"] = self.supernet_summary
            facts["logits_history"] = self.supernet.history if self.supernet is not None else []
        return facts

    def summary(self) -> dict[str, Any]:
        """result.json's `logits_history` and `dmasking` entries, once the supernet is trained."""
        if self.supernet is None or not self.supernet.history:
            return {}
        return {"logits_history": self.supernet.history, "dmasking": self.supernet_summary}
