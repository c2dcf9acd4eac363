"""Throughput of a search on a shared study: completed trials per hour with 1 and with 2 local workers.

    python tools/bench_workers.py [--workers 1,2] [--trials 16] [--latency-seconds 0] [--storage sqlite|postgresql]
                                  [--json OUT]
    python tools/bench_workers.py --overhead      # the store's cost per trial, SQLite and PostgreSQL

Runs `onnxconet search --workers N` of ResNet-20 on Fashion-MNIST (the cached teacher of docs/cells/fashion,
a 2,000-image training subset, one epoch per trial) with `--budget-on flops` (no latency measurement decides
anything: by default trials are not timed, `--latency-seconds 0`; with a value > 0 each trial is timed by one
worker at a time while the other pauses) and one training thread per worker (`--torch-threads 1`).
Throughput = finished trials / (last trial's end - first trial's start), read from the study's own timestamps:
the preparation and the final fine-tune are left out, a worker's start-up is not. Prints per N: the window, the
trials per hour, the mean seconds of one trial (from the records), the speed-up over the first N, and which
worker ran how many. Needs `apt-get install dataset-fashion-mnist`; postgresql needs tools/install_services.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from onnxconet.provenance import code_versions  # noqa: E402
from onnxconet.search.study import open_storage  # noqa: E402

TEACHER = ROOT / "docs/cells/fashion/teacher_fashion-mnist-resnet20-fashion-mnist_0.pt"


def run(n: int, args, url: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "onnxconet", "search", "models/fashion_mnist.py:resnet20", "--data", args.data,
           "--weights", str(TEACHER), "--train-samples", str(args.train_samples), "--budget-on", "flops",
           "--budget", "0.5", "--trials", str(args.trials), "--epochs-per-trial", "1", "--final-epochs", "0",
           "--latency-seconds", str(args.latency_seconds), "--threads", "1", "--provider", "cpu", "--workers", str(n),
           "--torch-threads", "1", "--storage", url, "--study", f"bench-{n}-{time.time_ns()}",
           "--out", str(out), "--json"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"workers={n}: search failed: {done.stderr.strip()[-1500:]}")
    result = json.loads(done.stdout)
    name = result["config"]["study"]
    trials = optuna.load_study(storage=open_storage(url), study_name=name).get_trials()
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    window = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    seconds = window.total_seconds()
    return {
        "workers": n,
        "trials": len(finished),
        "window_s": round(seconds, 1),
        "trials_per_hour": round(3600 * len(finished) / seconds, 1),
        "trial_mean_s": round(sum(r["seconds"] for r in result["trials"]) / len(result["trials"]), 2),
        "phase_mean_s": {
            k: round(sum(r["extra"]["phase_seconds"][k] for r in result["trials"]) / len(result["trials"]), 2)
            for k in result["trials"][0]["extra"]["phase_seconds"]
        },
        "by_worker": dict(Counter(r["worker"] for r in result["trials"])),
        "wall_s": round(wall, 1),
        "lost": result["study"]["lost"],
    }


def overhead(url: str, sizes=(10, 100, 500)) -> list[dict]:
    """Seconds the store costs one trial (claim: the strategy rebuilt from every finished trial, then asked;
    record: rebuilt again, told, written) when the study already holds n finished trials, with anneal's
    bookkeeping replaced by a trivial strategy: the store's and the replay's share, not training."""
    from onnxconet.search.study import create_study
    from onnxconet.search.workers import StudyWorker
    from tests.test_workers import Pick, Quick, meta

    rows = []
    for n in sizes:
        study = create_study(open_storage(url), f"overhead-{n}-{time.time_ns()}", meta(n + 5), resume=False)
        worker = StudyWorker(study, Pick(), Quick(0.0), n, Path(tempfile.gettempdir()), heartbeat=60)
        worker.run()  # n finished trials
        worker.trials = n + 5
        t0 = time.perf_counter()
        for _ in range(5):
            all_trials = study.get_trials(deepcopy=False)
            worker.run_trial(*worker.claim(all_trials, len(all_trials)))
        rows.append({"finished": n, "seconds_per_trial": round((time.perf_counter() - t0) / 5, 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--storage", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--latency-seconds", type=float, default=0.0,
        help="in-loop timing of every trial (0: untimed, as the FLOPs budget allows; >0: measured by one worker "
        "at a time, the other paused)",
    )  # fmt: skip
    ap.add_argument("--overhead", action="store_true", help="only the store's cost per trial (no training)")
    args = ap.parse_args()
    if args.overhead:
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            urls = {"sqlite": f"sqlite:///{tmp / 'o.db'}"}
            try:
                from tests.pg_server import loopback_postgres

                urls["postgresql"] = stack.enter_context(loopback_postgres())
            except RuntimeError as e:
                print(f"postgresql left out: {e}")
            for name, url in urls.items():
                for r in overhead(url):
                    print(f"{name}: {r['finished']} finished trials -> {r['seconds_per_trial']} s per trial")
        return
    rows = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.storage == "postgresql":
            from tests.pg_server import loopback_postgres

            url = stack.enter_context(loopback_postgres())
        for n in [int(x) for x in args.workers.split(",")]:
            if args.storage == "sqlite":
                url = f"sqlite:///{tmp / f'study-{n}.db'}"
            rows.append(run(n, args, url, tmp / f"run-{n}"))
            r = rows[-1]
            print(
                f"workers {n}: {r['trials']} trials in {r['window_s']} s = {r['trials_per_hour']} trials/h "
                f"(one trial {r['trial_mean_s']} s: {r['phase_mean_s']}; {r['by_worker']}; wall {r['wall_s']} s)",
                flush=True,
            )
    base = rows[0]["trials_per_hour"]
    for r in rows:
        r["speedup"] = round(r["trials_per_hour"] / base, 2)
    print(
        f"speed-up over {rows[0]['workers']} worker(s): "
        + ", ".join(f"{r['workers']}: {r['speedup']}x" for r in rows)
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {"code": code_versions(), "storage": args.storage, "cpus": os.cpu_count(), "rows": rows,
                "command": " ".join(sys.argv)}  # fmt: skip
        args.json.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
