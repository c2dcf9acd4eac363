"""`dmasking`: FBNetV2's DMaskingNAS on the channel groups, as a strategy of the search run.

Phase 1, the supernet (`supernet.py`; once, in `DMaskingStrategy.prepare(ctx, records)`, which the run calls
before the first trial; `ask` never trains; `masks.Supernet`): the original at full width, one set of
logits per channel group over its width options, the group's channels multiplied by the staircase of
Gumbel-softmax weights (hooks, no change to the user's code). Weights (SGD, cosine) and logits (Adam, lr 0.01,
wd 5e-4) are updated in alternation, one step each, on disjoint seeded splits of the training data (80/20); the
logits stay frozen for the first `warmup` share of the epochs (the weights first learn to work at every width);
τ starts at 5 and is multiplied by 0.956 per epoch. Both steps use the search's distillation loss (soft targets
from the original, mixed with the labels).

One deliberate departure (`hard`, default "weights"): the weights step uses the *one-hot* of the Gumbel sample,
i.e. it trains one real sub-network per step drawn from the current distributions; the logits step keeps
FBNetV2's soft masks. FBNetV2 retrains the derived network from scratch, so soft-mask weights do not matter to
it; here the derived candidates inherit the supernet's weights and get one fine-tuning epoch. Measured on the
digits CNN (FLOPs budget 0.35, 6 supernet epochs, 1 fine-tuning epoch per candidate; validation accuracy of the
argmax / expected / sampled candidates): soft 57.6 / 98.9 / 38.7%, hard weights 97.4 / 97.8 / 97.0%. With soft
masks at τ >= 3 the weights never see a channel switched off, and a narrow candidate starts far from them.

Cost term (differentiable in the width distributions p_g = softmax(α_g / τ), i.e. without the Gumbel noise,
which only adds variance to an expectation):
  * --budget-on latency: `LatencyPredictor.expected_latency` of a predictor calibrated on this target (the
    run's own, else dmasking's: a few measured probes, `latency_predictor.json` in the run directory): exact
    E[ratio] of the fitted model under independent groups, which for a layer whose input and output widths
    are both searched is Σ_ij p_in,i p_out,j LUT(c_i, c_j).
  * --budget-on flops | params: FBNetV2's effective shapes (`search/effective.py`): every weight's element
    count is a product of per-axis extents, each linear in the widths of the groups that axis carries; its
    expectation under independent groups is E[d0]·E[d1] + Σ_g n0_g n1_g Var(ρ_g), exact (it equals
    `count_flops` / `count_params` for one-hot distributions).

Loss of the logits step (`loss`):
  * "hinge" (default): task + penalty · max(0, E[ratio] / budget - 1). The search has a budget, and a hinge
    steers the expected cost onto it whatever the model's size; below the budget only accuracy counts (the
    search's own Objective is the same hinge). FBNet's multiplicative form has no budget in it: where the
    result lands depends on a and b, which were tuned for one phone's milliseconds.
  * "fbnet": task · a · log(LAT)^b (a = 0.2, b = 0.6) with LAT the expected latency in µs (or MMACs, or
    thousands of params), for comparison.

Phase 2, derivation (`derive.py`; one trial per `ask`): trial 0 the argmax option of every group, trial 1 the
expected width under the final distributions, later trials samples from them; each is put onto the budget as
predicted (one scale factor for all groups, widths snapped to the group's grid: the run's widths, which follow
its --align) under `margin` × budget for latency (measurement noise; the margin is
corrected by the ratio measured / predicted of the trials told so far; and each candidate is measured before
it is handed out: over the budget, its prediction is scaled by measured / predicted and it is put back on the
budget, `verify`).
The run evaluates them like any candidate (cut from the supernet's weights, the bank `prepare` returns in its
`Setup`, keeping the channels in staircase order, BN recalibrated, fine-tuned with distillation, measured) and
finishes the best as for anneal.

Short searches: FBNetV2's logits learning rate (0.01) assumes ~10^5 logits steps; a search of a dozen epochs on
a small dataset takes a few hundred, and the logits move by well under 1 (digits CNN, 12 epochs: |α| <= 0.9, at
τ >= 3). The argmax is then a weak signal, which is why trial 1 (the expected width) and the samples exist; the
driver keeps the best feasible one. `arch_lr` is configurable.

Input resolution (`--resolutions`, FBNetV2's spatial search; `search/resolution.py` builds the per-resolution
graphs and costs): one more logits vector β over the resolutions, Gumbel-softmax with the same τ. The weights
step samples one resolution (hard) and resizes its batch to it (bilinear, align_corners=False); the teacher's
soft targets come from the batch as loaded (the original's own input). The logits step takes the expectation
over resolutions of the task loss, Σ_r w_r · L_r with w = GumbelSoftmax(β; τ) (one forward per resolution, all
under the same width masks: exact gradients for β, no straight-through noise on a choice that has few
options; one-hot forward with straight-through gradients under hard="both"). Cost: Σ_r p_r · scale_r ·
E_r[ratio] with p = softmax(β / τ), E_r the expected width cost on r's graph and scale_r its full-width cost
relative to the baseline at the model's own input shape (which the budget stays relative to). Derivation:
the argmax resolution r* (ties: the larger; a resumed run keeps the one its trials were recorded at) is bound
and every derived candidate is put on the budget with r*'s cost, measured sliced from r*'s graph; `prepare`
returns r* in its `Setup`, and the run trains, validates and exports at r*.

Depth (`--depth`, off by default as for every strategy but knapsack): a group whose residual branch can be
removed (`graph.branches`) gets one more option, width 0, whose staircase column is all zeros. A one-hot sample
of it (the weights step) zeroes the group's channels, so the branch computes exactly what the removed branch
leaves (its constant offset) and the weights learn to do without it. Soft weights (the logits step) also fade
the branch's exit into the residual merge by 1 - w_0 (`masks.Supernet`, `GateSite`): without that, the next
BatchNorm would normalize away the share 1 - w_0 of the group's channels and the task loss would not see the
option. The cost sees width 0 as the latency predictor and the effective shapes do (the branch's nodes gone).
A group whose exit no torch module stands for keeps its branch (a stage line says so).

Resume: the supernet state (weights, logits, both optimizers, the logits' history) is checkpointed after every
epoch in `dmasking.pt`; a killed run continues at the next epoch, and once the supernet is done the derived
trials are replayed from the history without training anything.
"""

from onnxconet.search.calibration import PREDICTOR
from onnxconet.search.dmasking.config import DMaskingConfig
from onnxconet.search.dmasking.derive import CHECKS
from onnxconet.search.dmasking.strategy import DMaskingStrategy
from onnxconet.search.dmasking.supernet import CHECKPOINT

__all__ = ["CHECKPOINT", "CHECKS", "PREDICTOR", "DMaskingConfig", "DMaskingStrategy"]
