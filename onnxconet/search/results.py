"""What a search run produces, typed: the baseline, the best network as shipped, and the whole result that
result.json, report.md and the CLI are written from (`SearchResult.to_json()` is result.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from onnxconet.search.config import Budget


def _drop_none(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


@dataclass
class Baseline:
    """The original (the teacher) as deployed. `latency_ms` is its median beside best.onnx in the final check;
    `latency_drift` how far its in-loop latency moved over the search; `input_shape` is set only when the best
    takes another input (resolution search)."""

    accuracy: float
    test_accuracy: float | None
    onnx: str
    latency_ms: float | None = None
    params: int | None = None
    flops: int | None = None
    latency_drift: dict | None = None
    input_shape: list[int] | None = None

    def to_json(self) -> dict:
        return _drop_none(asdict(self), ("input_shape",))


@dataclass
class DeployedLatency:
    """best.onnx against baseline.onnx as deployed (`search.finish.deployed_latency`)."""

    method: str
    how: str
    provider: str
    ratio: float
    ratio_p10: float
    ratio_p90: float
    ratios: list[float]
    load: float | None
    disturbed: bool
    threads: int
    by_threads: dict[str, dict]
    fewer_threads_faster: bool | None = None
    ratio_ci: list[float] | None = None  # 95% CI of the median per-pair ratio (`RelativeStats.ratio_ci`)

    def to_json(self) -> dict:
        return _drop_none(asdict(self), ("fewer_threads_faster", "ratio_ci"))


@dataclass
class BestRecord:
    """The network that shipped: its widths, accuracy, latency as deployed, size, and how it was chosen
    (`confirm_ratios`: the trials re-measured before choosing; `race`: the final race against the start)."""

    trial: int
    widths: dict[str, int]
    latency_ms: float
    latency_ratio: float
    speedup: float
    params: int
    flops: int
    flops_ratio: float
    params_ratio: float
    budget_met: bool
    max_abs_diff: float
    max_rel_diff: float
    onnx: str
    latency: DeployedLatency | None = None
    accuracy: float | None = None
    test_accuracy: float | None = None
    search_accuracy: float | None = None
    confirm_ratios: dict[int, float] | None = None
    race: dict | None = None
    # "search": the search's own widths shipped; "start": the widths it started from (anneal's uniform start,
    # after losing its race or never leaving it; the uniform baselines always)
    shipped: str = "search"

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["latency"] = self.latency.to_json() if self.latency else None
        return _drop_none(d, ("latency", "confirm_ratios", "race"))


@dataclass
class SearchResult:
    """Everything a run reports. `trials` are the history's records (a trial's fields plus the facts its strategy
    recorded); `extra` holds a strategy's own result entries (`Strategy.summary()`)."""

    config: dict
    baseline: Baseline
    budget: Budget
    best: BestRecord
    trials: list[dict]
    pareto: list[int]
    groups: list[dict]
    provider: str
    onnxruntime: str
    host: str
    deployment: str
    seconds: float | None = None
    resolution: int | None = None
    input_shape: list[int] | None = None
    # which code produced it and where it was measured (search.finish.provenance)
    provenance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """result.json."""
        d = {
            "config": self.config,
            "baseline": self.baseline.to_json(),
            "budget": self.budget.to_json(),
            "best": self.best.to_json(),
            "trials": self.trials,
            "pareto": self.pareto,
            "groups": self.groups,
            "provider": self.provider,
            "onnxruntime": self.onnxruntime,
            "host": self.host,
            "deployment": self.deployment,
            "seconds": self.seconds,
            "provenance": self.provenance,
        }
        if self.resolution is not None:
            d |= {"resolution": self.resolution, "input_shape": self.input_shape}
        return d | self.extra
