"""`anneal`: CONetV2's metric-guided width moves with a real simulated-annealing acceptance.

A move starts from the accepted state's widths and resizes each group by
    factor = clip(1 + gain * (Δ_g - mean Δ) + N(0, noise * T / T0), 0.5, 2)
where Δ_g is the change of the group's momentum-smoothed QC (M <- γM + m, CONetV2) since the previous trial:
groups whose layers are still gaining rank grow, the others shrink. The move is then scaled back onto the
budget by the cost model (predicted ratio just under the budget), so the metric decides *where* the
channels go and the budget decides *how many* — unlike CONetV2, where γ was the only size knob.
The new trial is accepted with the Metropolis rule on the objective (accuracy minus a hinge on the budget);
the temperature cools geometrically. The first trial is the uniform widths on the budget (what `l1` proposes):
the search starts from that baseline and leaves it only for a trial that scores better. With
`--final-from original` the trials are paired (each cut from the original, same batches; search/setup.py), so
"scores better" means better widths, not more accumulated training or luckier batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxconet.metrics.conet import MetricMomentum
from onnxconet.search.base import Objective, Strategy, Trial, TrialState
from onnxconet.search.cost import CostModel
from onnxconet.space import WidthSpace


@dataclass(frozen=True)
class AnnealConfig:
    """Knobs of `anneal`: t0 and cooling (temperature per trial: t0 · cooling^n), gamma (CONetV2's momentum of
    the metric), gain (how far Δ moves a group), noise (relative, scaled by the temperature), margin (moves are
    put on margin × budget)."""

    t0: float = 0.02
    cooling: float = 0.85
    gamma: float = 0.8
    gain: float = 4.0
    noise: float = 0.15
    margin: float = 0.97


class AnnealStrategy(Strategy):
    name = "anneal"

    def __init__(
        self,
        space: WidthSpace,
        objective: Objective,
        cost: CostModel,
        init: dict[int, int],
        config: AnnealConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(space, objective, seed)
        c = config or AnnealConfig()
        self.cost, self.init, self.margin = cost, dict(init), c.margin
        self.rng = np.random.default_rng(seed)
        self.t0, self.temperature, self.cooling, self.gain, self.noise = (
            c.t0,
            c.t0,
            c.cooling,
            c.gain,
            c.noise,
        )
        self.momentum = MetricMomentum(c.gamma)
        self.delta: dict[int, float] = {}
        self.current: Trial | None = None
        self.told = 0

    def anchor(self) -> dict[int, int]:
        """The widths the search started from (its first trial); see search/race.py."""
        return dict(self.init)

    def ask(self) -> dict[int, int]:
        if self.told == 0 and not self.running:  # (another worker already trains the start: move from it)
            return dict(self.init)
        base = self.current.widths if self.current is not None else self.init
        mean = float(np.mean(list(self.delta.values()))) if self.delta else 0.0
        scale = self.noise * self.temperature / self.t0
        proposal = {}
        for g in self.space:
            d = self.delta.get(g.id, 0.0) - mean
            factor = float(np.clip(1.0 + self.gain * d + self.rng.normal(0.0, scale), 0.5, 2.0))
            proposal[g.id] = base.get(g.id, g.hi) * factor
        widths = self.cost.rescale(proposal, self.objective.budget * self.margin)
        if widths == base and len(self.space):  # nothing moved after rounding: nudge one group each way
            ids = [g.id for g in self.space]
            up, down = self.rng.choice(ids, size=2, replace=len(ids) < 2)
            widths = dict(widths)
            widths[int(up)] = self.space.groups[int(up)].up(widths[int(up)])  # from 0 (--depth): back to lo
            widths[int(down)] = self.space.groups[int(down)].clip(
                widths[int(down)] - self.space.groups[int(down)].step
            )
        return widths

    def tell(self, trial: Trial) -> dict:
        self.told += 1
        if trial.state is TrialState.COMPLETE and trial.metrics:
            for gid, m in trial.metrics.items():
                before = self.momentum.value(str(gid)) or 0.0
                after = self.momentum.update(str(gid), [m])
                self.delta[int(gid)] = after - before
        j_new = self.objective(trial)
        j_cur = self.objective(self.current) if self.current is not None else -math.inf
        if trial.state is not TrialState.COMPLETE:
            accept = False
        elif j_new >= j_cur:
            accept = True
        else:
            accept = bool(self.rng.random() < math.exp((j_new - j_cur) / max(self.temperature, 1e-9)))
        recorded = trial.extra.get("accepted")
        if recorded is not None:  # replaying a recorded trial: its decision stands (on a shared study another
            accept = bool(
                recorded
            )  # worker may have decided it against a state this replay orders differently)
        temperature = self.temperature
        if accept:
            self.current = trial
        self.temperature *= self.cooling
        return {
            "accepted": accept,
            "objective": None if math.isinf(j_new) else j_new,
            "temperature": temperature,
        }
