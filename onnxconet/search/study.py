"""The trial store of a search on many workers: an Optuna study on an existing engine.

`--storage` names it: an SQLite file (`sqlite:///PATH`; the embedded default, `study.db` in the run folder), a
server (`postgresql://…`, `mysql+pymysql://…`) for workers on several machines, or a journal file on a shared
file system (`journal:PATH`). Optuna keeps the trials' states (running / complete / failed) and, on the SQL
engines, their heartbeats: a worker that dies stops beating, the next worker to look fails its trial and
enqueues a copy of it (`RetryHeartbeatStaleTrialCallback`), so the trial is run again, never lost. Optuna's
journal storage has no heartbeat: there each worker writes a "beat" time into its trial's system attributes and
the same rule (three missed beats) is applied by the workers (search/workers.py; it trusts the machines' clocks).

What onnxconet stores (all JSON):
- the study's user attribute "onnxconet": the run's config, its folder, the budget, the baseline's latency
  and accuracies, the fingerprint of the model's channel graph, the number of trials and the strategy's start widths;
- per Optuna trial: "widths" when it is claimed, "record" (the history line: `Trial.to_json()` + the
  strategy's facts) when it ends; its value is the objective (-inf for a failed candidate). A candidate that
  failed (NaN, an exception) is a finished trial (COMPLETE with -inf), as in history.jsonl; FAIL is a worker
  lost, or a surplus claim (`surplus` attribute) that two workers raced for.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from onnxconet.errors import OnnxconetError

log = logging.getLogger(__name__)
STUDY_DB = "study.db"
META = "onnxconet"
ENGINES = "sqlite:///PATH, postgresql://USER@HOST/DB, mysql+pymysql://USER@HOST/DB or journal:PATH"


def _optuna():
    try:
        import optuna
    except ImportError:  # pragma: no cover - a dependency; a broken install
        raise OnnxconetError("--storage needs optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the heartbeat outside Study.optimize is what search/workers.py means to use (ask/tell with its own beat)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
    )
    return optuna


def default_storage(out: str | Path) -> str:
    """The embedded default: an SQLite file in the run folder."""
    return f"sqlite:///{Path(out).resolve() / STUDY_DB}"


def open_storage(url: str, heartbeat: float = 10.0):
    """The Optuna storage behind `url` (module docstring); `heartbeat` seconds between a running trial's beats
    (a trial is stale after three missed beats). Raises OnnxconetError naming the URL when it cannot open."""
    optuna = _optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if not re.match(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://", url):
        raise OnnxconetError(f"--storage {url!r}: not a storage URL; give {ENGINES}")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # several processes write one file: wait, don't fail
    else:
        engine = {"pool_pre_ping": True}
    interval = max(1, int(round(heartbeat)))
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=interval, grace_period=3 * interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - driver errors come in many types; one line naming the URL
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxconetError(f"--storage {redact(url)}: cannot open it ({first[:200]})") from None


def redact(url: str) -> str:
    """`url` without its password (for messages and result.json), as SQLAlchemy parses it."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: hide everything between :// and @
        return re.sub(r"://[^@]*@", "://***@", url)


@dataclass
class StudyMeta:
    """What every worker needs to rebuild the run (module docstring)."""

    config: dict
    out: str
    budget: float
    baseline: dict  # the original as the first process measured it: ms, accuracy, test_accuracy
    fingerprint: str
    trials: int
    start: dict[int, int] | None  # anneal's first widths
    heartbeat: float = 10.0  # seconds between beats: every worker uses the study's
    observed: list = None  # the cost model's corrections before the first trial (`CostModel.observed`)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["observed"] = d["observed"] or []
        d["start"] = {str(k): v for k, v in self.start.items()} if self.start else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> StudyMeta:
        d = dict(d)
        d["start"] = {int(k): int(v) for k, v in d["start"].items()} if d.get("start") else None
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def existing(storage, name: str, resume: bool, fingerprint: str | None = None) -> StudyMeta | None:
    """The meta of study `name` when it exists (then `resume` must be asked for, and the model must be the same),
    else None. Called before any training: a wrong --study or a missing --resume fails at once."""
    optuna = _optuna()
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return None
    if not resume:
        raise OnnxconetError(
            f"study {name!r} already exists in the storage: pass --resume to continue it, or choose another "
            "--study"
        )
    attrs = optuna.load_study(storage=storage, study_name=name).user_attrs
    if META not in attrs:
        return None  # created, but its first process died before it was prepared: prepare it again
    old = StudyMeta.from_json(attrs[META])
    if fingerprint is not None and old.fingerprint != fingerprint:
        raise OnnxconetError(f"study {name!r} belongs to another model (fingerprint); choose another --study")
    return old


def create_study(storage, name: str, meta: StudyMeta):
    """Study `name` (new, or the existing one of a resumed run) holding `meta`: written once the run is prepared,
    so a worker that joins finds everything it needs."""
    optuna = _optuna()
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    study.set_user_attr(META, meta.to_json())
    return study


def load_study(storage, name: str, wait: float = 0.0, on_wait=None):
    """(study, meta) of an onnxconet study; waits up to `wait` seconds for the run's first process to prepare it
    (`on_wait(text)` once), else one line saying how to make it."""
    optuna = _optuna()
    deadline = time.monotonic() + wait
    while True:
        try:
            study = optuna.load_study(storage=storage, study_name=name)
            if META in study.user_attrs:
                return study, StudyMeta.from_json(study.user_attrs[META])
        except KeyError:
            pass
        if time.monotonic() >= deadline:
            raise OnnxconetError(
                f"no study {name!r} in the storage (waited {wait:g} s): start it with `onnxconet search … "
                f"--storage URL --study {name}`, or give it longer with --wait"
            )
        if on_wait is not None:
            on_wait(f"waiting for study {name!r}: the run's first process is preparing it")
            on_wait = None
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def finished(trials) -> list:
    """The finished trials (each holds its history record), in the order they finished."""
    done = [t for t in trials if t.state.name == "COMPLETE" and "record" in t.user_attrs]
    return sorted(done, key=lambda t: (t.datetime_complete, t.number))


def records(trials) -> list[dict]:
    """The history records of the finished trials, in the order they finished."""
    return [t.user_attrs["record"] for t in finished(trials)]


def objective_value(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def accounting(trials) -> dict:
    """How the study's trials ended: finished, running, waiting (retries), lost (a worker died: failed by the
    heartbeat and enqueued again), surplus (claimed by two workers racing for the last trial, not run)."""
    counts = {"finished": 0, "running": 0, "waiting": 0, "lost": 0, "surplus": 0}
    for t in trials:
        if t.state.name == "COMPLETE":
            counts["finished"] += 1
        elif t.state.name == "RUNNING":
            counts["running"] += 1
        elif t.state.name == "WAITING":
            counts["waiting"] += 1
        elif t.user_attrs.get("surplus"):
            counts["surplus"] += 1
        else:
            counts["lost"] += 1
    return counts
