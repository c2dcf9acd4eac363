"""Baselines for benchmarks, on the same interface as the searches.

- `l1`: every group scaled by one factor onto the budget (uniform widths), keeping the top-L1 channels of the
  original (magnitude pruning). With a latency budget its widths are placed before training as deployed
  (`search/setup.py: deployed_placement`), the same landing the knapsack gets: landed by in-loop measurements, one
  Fashion-MNIST seed at 0.3 read 24/12/4 at 0.364 in-loop and shipped 20/8/4 at 0.267 as deployed, while the other
  seeds shipped 24/12/4 at 0.28.
- `scratch` (formerly `uniform`): the same uniform widths with re-initialized weights (width scaling trained from
  scratch with distillation for the same epochs: Liu et al. 2019's control).
- `random`: random widths scaled onto the budget, each trial cut from the original (best one wins).
- `knapsack`: latency-saliency widths (HALP, search/knapsack.py), placed like `l1`'s; the same protocol as `l1`,
  other widths.

A placed strategy keeps its widths while their trials measure within the budget (placing again on every trial
moved a knapsack placement measured at 0.482 of a 0.5 budget to one measured at 0.534) and places them again, on
the cost model refitted with what was measured, after a trial over it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxconet.search.base import Objective, Strategy, Trial, widths_key
from onnxconet.search.cost import CostModel
from onnxconet.space import WidthSpace


class L1Strategy(Strategy):
    """The uniform widths on the budget, cut from the original by L1 norm. `place(target) -> widths` (default:
    every group scaled by one factor onto `target` by the cost model); `widths`: the placement measured before
    training (else placed on the first ask) and `placement` its record; `target`: what a placement after a trial
    over the budget aims at (default: the budget)."""

    name = "l1"
    absorb = False
    searches = False

    def __init__(
        self,
        space: WidthSpace,
        objective: Objective,
        cost: CostModel,
        seed: int = 0,
        place: Callable[[float], dict[int, int]] | None = None,
        widths: dict[int, int] | None = None,
        target: float | None = None,
        placement: list[dict] | None = None,
    ) -> None:
        super().__init__(space, objective, seed)
        self.cost = cost
        self.place = place or (lambda t: cost.uniform(t))
        self.widths, self.placement = widths, placement or []
        self.target = objective.budget if target is None else target

    def summary(self) -> dict:
        """result.json's record of the placement measured as deployed (`search/setup.py: deployed_placement`)."""
        return {"placement": self.placement} if self.placement else {}

    def as_deployed(self) -> dict[tuple, float]:
        return {widths_key(p["widths"]): p["ratio"] for p in self.placement if p.get("fits")}

    def ask(self) -> dict[int, int]:
        if self.widths is None:
            self.widths = self.place(self.target)
        return dict(self.widths)

    def tell(self, trial: Trial) -> dict:
        if not self.objective.feasible(trial):
            self.widths = None  # over the budget as measured: placed again on the refitted cost model
        return {"accepted": True, "objective": self.objective(trial)}


class ScratchStrategy(L1Strategy):
    """The uniform widths on the budget, trained from re-initialized weights."""

    name = "scratch"
    reinit = True


class RandomStrategy(Strategy):
    """Random relative widths (log-uniform factors in [1/4, 1]) scaled onto the budget."""

    name = "random"
    absorb = False

    def __init__(self, space: WidthSpace, objective: Objective, cost: CostModel, seed: int = 0) -> None:
        super().__init__(space, objective, seed)
        self.cost, self.rng = cost, np.random.default_rng(seed)

    def ask(self) -> dict[int, int]:
        raw = {g.id: g.hi * float(2.0 ** self.rng.uniform(-2, 0)) for g in self.space}
        return self.cost.rescale(raw, self.objective.budget)

    def tell(self, trial: Trial) -> dict:
        return {"accepted": True, "objective": self.objective(trial)}


class KnapsackStrategy(L1Strategy):
    """The widths with the most Taylor importance (or measured loss) per predicted latency under the target,
    `knapsack_widths` or the loss path; `place(target) -> widths` is that solver (search/setup.py binds it to the
    run)."""

    name = "knapsack"
    searches = True

    def __init__(
        self,
        space: WidthSpace,
        objective: Objective,
        cost: CostModel,
        place: Callable[[float], dict[int, int]],
        seed: int = 0,
        widths: dict[int, int] | None = None,
        target: float | None = None,
        placement: list[dict] | None = None,
    ) -> None:
        super().__init__(space, objective, cost, seed, place, widths, target, placement)
