"""What a search run is asked to do (`SearchConfig`, filled by the CLI or a script) and the budget it is held to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from onnxconet.errors import OnnxconetError
from onnxconet.latency.profile import Target
from onnxconet.search.dmasking import DMaskingConfig
from onnxconet.search.resolution import check_resolutions
from onnxconet.search.study import redact

# the --strategy names; "uniform" is the old name of "scratch" (uniform widths trained from re-initialized weights)
STRATEGY_NAMES = ("anneal", "dmasking", "random", "l1", "scratch", "knapsack")
ALIASES = {"uniform": "scratch"}
DEFAULT_MODEL = "models/digits_cnn.py:digits_cnn"
# the strategy a run gets unless told: the one that beat uniform pruning and Torch-Pruning at equal latency as
# deployed on Fashion-MNIST (docs/measurements.md); STRATEGY_DEFAULTS gives its settings
DEFAULT_STRATEGY = "knapsack"
# what a SearchConfig field left None means, by strategy (SearchConfig.check fills them in). The knapsack's are the
# benched ones: the loss path's placement with removable residual branches, measured as deployed before its one
# trial (a second trial would train the same widths again), the search's epochs moved to the final fine-tune
COMMON_DEFAULTS = dict(start="uniform", importance="taylor", depth=False, trials=12, final_epochs=4)
# placed as deployed before training, their trials train the same widths: one trial, the epochs moved to the final
# fine-tune (the same total as the other strategies' 12 + 4)
PLACED_DEFAULTS = dict(trials=1, final_epochs=15)
STRATEGY_DEFAULTS = {
    "knapsack": PLACED_DEFAULTS | dict(importance="path", depth=True),
    "l1": PLACED_DEFAULTS,
    "scratch": PLACED_DEFAULTS,
}


def strategy_defaults(strategy: str) -> dict:
    """The settings `strategy` runs with where the config leaves them None."""
    return COMMON_DEFAULTS | STRATEGY_DEFAULTS.get(ALIASES.get(strategy, strategy), {})


@dataclass
class SearchConfig:
    """Everything a search run needs; the CLI fills it from its options."""

    model: str | None = None
    data: str = "digits"
    train_samples: int | None = None  # a stratified subset of the training split (data.load_data)
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    strategy: str | None = DEFAULT_STRATEGY
    # None in strategy: DEFAULT_STRATEGY; in start, importance, depth, trials and final_epochs: the strategy's
    # default (strategy_defaults)
    # the first widths. anneal: "uniform" (every group scaled by one factor onto the budget: what l1 proposes) or
    # "knapsack" (latency saliency: the most Taylor importance per predicted latency; search/knapsack.py).
    # knapsack: where its greedy fill starts, "uniform" (the uniform widths on the budget, then the budget left
    # spent by latency saliency) or "smallest" (HALP's own: every group at its minimum)
    start: str | None = None
    # the latency saliency's importance (knapsack, anneal --start knapsack): "taylor" (first-order Taylor of the
    # original on the validation split, per channel) or "loss" (each group's validation loss measured at each of
    # its widths: search/sensitivity.py) or "path" (NetAdapt-like backward elimination on measured loss: the
    # knapsack's `start` does not apply, the path starts from the whole network)
    importance: str | None = None
    budget: str = "0.5"
    budget_on: str = "latency"
    provider: str = "auto"
    threads: int = 0
    trials: int | None = None
    epochs_per_trial: int = 1
    final_epochs: int | None = None
    # where the best widths' final fine-tuning starts: "trial" = the best trial's fine-tuned weights (what the
    # search already trained), "original" = cut afresh from the original (or, for `uniform`, from its
    # re-initialized weights): every strategy's widths then get the same training, as when CONetV2 and
    # FBNetV2 retrain the widths they found; tools/bench_search.py compares widths this way. The trials then
    # only rank widths: each is cut from the original and trained on the same batches (a paired comparison)
    final_from: str = "trial"
    pretrain_epochs: int = 8
    batch_size: int = 64
    lr: float = 0.05
    alpha: float = 0.5
    temperature: float = 4.0
    min_ratio: float = 0.125
    align: int = 8
    # groups whose residual branch can be removed may take width 0 (graph/branches.py): depth as a width
    depth: bool | None = None
    penalty: float = 1.0
    latency_seconds: float = 2.0
    # process pairs of a measurement as deployed (reachability, the choice of the trial to finish, the final
    # check); pairs are added up to twice this while they disagree
    deployed_pairs: int = 4
    probes: int = 12
    max_batches: int | None = None
    out: str = "runs/search"
    resume: bool = False
    seed: int = 0
    device: str | None = None  # torch device of the training
    # where latency is measured: "" = this machine, ssh://user@host or http://host:port (latency/device.py)
    latency_target: str = ""
    ort_config: dict = field(default_factory=dict)  # onnxruntime session config entries the deployment sets
    dmasking: dict = field(default_factory=dict)  # DMaskingConfig overrides (search/dmasking/config.py)
    resolutions: list[int] | None = None  # square input sizes searched by dmasking (search/resolution.py)
    # many workers on a shared Optuna study (search/parallel.py): its storage URL (default: OUT/study.db when
    # workers > 1), its name (default: OUT's name), local worker processes, seconds between heartbeats, and
    # training threads per worker (0: the cores shared among the workers)
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    heartbeat: float = 10.0
    torch_threads: int = 0
    # data-parallel processes per training (a trial's fine-tune, dmasking's supernet): train/ddp.py
    nproc_per_trial: int = 1

    @property
    def on_study(self) -> bool:
        return self.workers > 1 or self.storage is not None

    def check(self) -> None:
        self.strategy = ALIASES.get(self.strategy, self.strategy) or DEFAULT_STRATEGY
        if self.strategy not in STRATEGY_NAMES:
            raise OnnxconetError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGY_NAMES)}")
        for key, value in strategy_defaults(self.strategy).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.budget_on not in ("latency", "flops", "params"):
            raise OnnxconetError(f"--budget-on {self.budget_on!r} is not latency, flops or params")
        if self.trials < 1:
            raise OnnxconetError(f"--trials must be >= 1, got {self.trials}")
        starts = {"anneal": ("uniform", "knapsack"), "knapsack": ("uniform", "smallest")}
        allowed = starts.get(self.strategy)
        if self.start not in (allowed or ("uniform",)):
            hint = (
                f": use {' or '.join(allowed)}"
                if allowed
                else "; it sets anneal's and knapsack's first widths"
            )
            raise OnnxconetError(f"--start {self.start!r} does not apply to --strategy {self.strategy}{hint}")
        if self.importance not in ("taylor", "loss", "path"):
            raise OnnxconetError(f"--importance {self.importance!r} is not taylor, loss or path")
        if self.importance != "taylor" and not (
            self.strategy == "knapsack" or (self.strategy == "anneal" and self.start == "knapsack")
        ):
            raise OnnxconetError(
                f"--importance {self.importance} ranks channels for the latency saliency only: use it with "
                "--strategy knapsack or --strategy anneal --start knapsack"
            )
        if self.final_from not in ("trial", "original"):
            raise OnnxconetError(f"--final-from {self.final_from!r} is not trial or original")
        if self.strategy == "dmasking":
            DMaskingConfig.from_dict(self.dmasking)
        if self.resolutions is not None:
            if self.strategy != "dmasking":
                raise OnnxconetError(
                    f"--resolutions is searched by --strategy dmasking only (not {self.strategy}); "
                    "add --strategy dmasking or drop --resolutions"
                )
            self.resolutions = check_resolutions(self.resolutions)
        if self.latency_seconds < 0 or (self.latency_seconds == 0 and self.budget_on == "latency"):
            raise OnnxconetError(
                f"--latency-seconds {self.latency_seconds:g}: a latency budget needs every trial timed (> 0); "
                "0 leaves trials untimed under a flops or params budget"
            )
        if self.deployed_pairs < 1:
            raise OnnxconetError(f"--deployed-pairs must be >= 1, got {self.deployed_pairs}")
        if self.workers < 1:
            raise OnnxconetError(f"--workers must be >= 1, got {self.workers}")
        if self.nproc_per_trial < 1:
            raise OnnxconetError(f"--nproc-per-trial must be >= 1, got {self.nproc_per_trial}")
        if self.batch_size % self.nproc_per_trial:
            raise OnnxconetError(
                f"--batch-size {self.batch_size} is the global batch of --nproc-per-trial "
                f"{self.nproc_per_trial} processes: make it divisible by {self.nproc_per_trial}"
            )
        if self.nproc_per_trial > 1 and self.resolutions is not None:
            raise OnnxconetError(
                "--nproc-per-trial shards the training batches; with --resolutions they are resized on the fly "
                "(not sharded yet): drop one of the two"
            )
        if self.heartbeat <= 0:
            raise OnnxconetError(f"--heartbeat must be > 0 seconds, got {self.heartbeat}")
        if self.on_study and self.strategy == "dmasking":
            raise OnnxconetError(
                "--strategy dmasking runs on one worker (its supernet is trained once, before its few trials); "
                "drop --workers/--storage"
            )
        self.target()  # validates the provider and threads

    def target(self) -> Target:
        """The deployment the budget is measured on: provider, threads, session options."""
        return Target(
            provider=self.provider, threads=self.threads, session_config=tuple(self.ort_config.items()),
            device=self.latency_target,
        )  # fmt: skip


def parse_budget(text: str, on: str, baseline_ms: float | None) -> tuple[float, float | None]:
    """'0.5' -> ratio 0.5; '12ms' -> 12 / baseline ms (latency only). Returns (ratio, ms or None)."""
    t = str(text).strip().lower()
    try:
        if t.endswith("ms"):
            if on != "latency" or not baseline_ms:
                raise OnnxconetError(f"--budget {text}: milliseconds need --budget-on latency")
            ms = float(t[:-2])
            return ms / baseline_ms, ms
        ratio = float(t)
    except ValueError:
        raise OnnxconetError(f"--budget {text!r} is neither a ratio (0.5) nor milliseconds (12ms)") from None
    if not 0 < ratio <= 1:
        raise OnnxconetError(f"--budget {text}: a ratio must be in (0, 1], e.g. 0.5 for half the baseline")
    return ratio, (ratio * baseline_ms if baseline_ms else None)


def config_json(cfg: SearchConfig) -> dict:
    """The config as recorded in history.jsonl and result.json (tools/bench_search.py compares runs by it)."""
    d = asdict(cfg)
    d["input_shape"] = list(cfg.input_shape) if cfg.input_shape else None
    d["model"] = cfg.model or DEFAULT_MODEL
    # start and importance are always kept: their defaults depend on the strategy (strategy_defaults), and a
    # worker joining a study reads the config back (search/parallel.py)
    defaults = (("resolutions", None), ("train_samples", None), ("storage", None),
                ("study", None), ("workers", 1), ("heartbeat", 10.0), ("torch_threads", 0),
                ("deployed_pairs", 4), ("nproc_per_trial", 1))  # fmt: skip
    if d.get("storage"):
        d["storage"] = redact(d["storage"])
    for key, default in defaults:
        if d.get(key) == default:
            d.pop(key, None)  # runs without it keep their config as before
    return d


@dataclass(frozen=True)
class Budget:
    """The budgeted quantity (latency | flops | params), its ratio to the baseline, and milliseconds (latency)."""

    on: str
    ratio: float
    ms: float | None = None

    def to_json(self) -> dict:
        return {"on": self.on, "ratio": self.ratio, "ms": self.ms}
