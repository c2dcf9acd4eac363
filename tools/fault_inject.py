"""Kill a search at many moments (SIGKILL, no cleanup), resume it each time, and check that nothing was lost.

    python tools/fault_inject.py                        # 32 kills over every phase of a small default search
    python tools/fault_inject.py --kills 8 --out /tmp/fi
    python tools/fault_inject.py -- --trials 6          # options after -- go to `onnxconet search`

How (onnxconet/faults.py): every phase of a search passes named failpoints ("trial 3/epoch 1 half",
"finish/write:best.onnx" — in the middle of writing that file, half of it on disk). First a reference run goes
uninterrupted and lists the points it reached (the census). Kill moments are chosen from the census, spread over
its phases, and taken in run order by chains: a fresh run folder, killed at the first moment; `--resume`, killed
at the next; ... until the run finishes. After every kill and resume the tool checks:
- every file of the run folder parses: JSON, JSON lines (a last line cut by the kill is allowed until the next
  resume repairs it), ONNX (checked and run), .pt (torch.load(weights_only=True)); no FILE.tmp survives a resume;
- no finished trial lost: the history lines written before the kill are still there, unchanged;
- no finished trial redone: the resumed process reaches no failpoint of a trial the history already held;
and at the end that the run's trials (widths, accuracies, decisions) and its best widths and accuracies equal the
reference's. The search is the built-in default with --budget-on flops (its choices do not depend on timing).
Prints kills survived / tried per phase; exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SEARCH = [
    "--budget-on", "flops", "--trials", "4", "--pretrain-epochs", "2", "--final-epochs", "1",
    "--latency-seconds", "0.05",
]  # fmt: skip
TIMING = {
    "seconds",
    "latency_ms",
    "latency_ratio",
    "latency",
    "confirm_ratios",
    "provenance",
    "phase_seconds",
}


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    search = SEARCH + extra + ["--seed", str(args.seed)]
    print(f"reference run (uninterrupted): onnxconet search {' '.join(search)}", flush=True)
    rc, census = _run(search, out / "reference", out / "census.log", fault=None, resume=False)
    if rc != 0:
        print(f"the reference run failed (exit {rc}); see {out / 'reference.err'}")
        return 1
    targets = choose(census, args.kills)
    print(
        f"{len(census)} failpoints reached; {len(targets)} kill moments over {len(_phases(targets))} phases"
    )
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # phase -> [survived, tried]
    failures: list[str] = []
    chain, todo = 0, list(targets)
    while todo:
        chain += 1
        folder = out / f"chain-{chain}"
        todo = _chain(search, folder, todo, tally, failures)
        failures += [f"{folder}: {p}" for p in same_result(out / "reference", folder)]
    _print(tally, failures)
    (out / "fault_inject.json").write_text(
        json.dumps(
            {"search": search, "phases": dict(tally), "failures": failures, "kills": len(targets)}, indent=1
        )
    )
    return 1 if failures else 0


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=32, help="kill moments to try (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fault_inject", help="work folder (emptied first)")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    return p.parse_args(argv[: argv.index("--")] if "--" in argv else argv), extra


def phase_of(name: str) -> str:
    """The phase a failpoint belongs to, for spreading kills and tallying them: "trial 3/epoch 1 end" -> "trial
    training", "finish/write:best.onnx" -> "write best.onnx"."""
    where, _, what = name.partition("/")
    if what.startswith("write:"):
        return "write " + what[len("write:") :].replace("bank.next.pt", "bank.pt")
    if where.startswith("trial"):
        return "trial training" if what.startswith("epoch") else "between trials"
    if where == "finish" and what.startswith("epoch"):
        return "final fine-tune"
    return where


def choose(census: list[tuple[str, int]], kills: int) -> list[tuple[str, int]]:
    """`kills` moments of the census, taken round-robin over its phases (each phase's moments spread over the run),
    returned in run order."""
    by_phase: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for event in census:
        by_phase[phase_of(event[0])].append(event)
    picks: dict[str, list] = {}
    rounds = 0
    while sum(len(v) for v in picks.values()) < min(kills, len(census)):
        rounds += 1
        for phase, events in by_phase.items():
            n = min(rounds, len(events))
            picks[phase] = [events[i] for i in np.linspace(0, len(events) - 1, n).round().astype(int)]
    order = {e: i for i, e in enumerate(census)}
    chosen = sorted({e for v in picks.values() for e in v}, key=order.__getitem__)
    while len(chosen) > kills:  # the last round overshot: drop from the phases with the most
        counts = defaultdict(int)
        for e in chosen:
            counts[phase_of(e[0])] += 1
        worst = max(counts, key=counts.get)
        chosen.remove(next(e for e in reversed(chosen) if phase_of(e[0]) == worst))
    return chosen


def _phases(events) -> set[str]:
    return {phase_of(e[0]) for e in events}


def _run(search, folder: Path, log: Path, fault, resume: bool) -> tuple[int, list[tuple[str, int]]]:
    """One `onnxconet search` process; returns (exit status, the failpoints it reached as (name, occurrence))."""
    log.unlink(missing_ok=True)
    env = dict(os.environ, ONNXCONET_FAULT_LOG=str(log))
    env.pop("ONNXCONET_FAULT", None)
    if fault is not None:
        env["ONNXCONET_FAULT"] = f"{fault[0]}:{fault[1]}"
    cmd = [sys.executable, "-m", "onnxconet", "search", *search, "--out", str(folder), "--json"]
    if resume:
        cmd.append("--resume")
    with open(folder.with_suffix(".err"), "ab") as err:
        rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err).returncode
    seen: dict[str, int] = defaultdict(int)
    events = []
    for name in log.read_text().splitlines() if log.is_file() else []:
        seen[name] += 1
        events.append((name, seen[name]))
    return rc, events


def _chain(search, folder: Path, todo: list, tally, failures: list[str]) -> list:
    """Kill one run folder at the moments of `todo` in turn, resuming after each, then let it finish; returns the
    moments not reached (the run had passed them when it resumed: they start another chain)."""
    resume = False
    while True:
        target = todo[0] if todo else None
        before = history_lines(folder)
        rc, events = _run(search, folder, folder.parent / "process.log", target, resume=resume)
        killed = target is not None and rc == -9
        problems = [] if killed or rc == 0 else [f"exit {rc}, see {folder.with_suffix('.err')}"]
        problems += redone(before, events) + lost(before, history_lines(folder)) + unreadable(folder, killed)
        if not killed:  # the run finished (or failed): the moments left are for another chain
            failures += [f"{folder} {'resume' if resume else 'run'} to the end: {p}" for p in problems]
            if target is not None and not resume:
                print(f"  {target[0]} (#{target[1]}) never reached: dropped", flush=True)
                todo = todo[1:]
            return todo
        todo, resume = todo[1:], True
        phase = phase_of(target[0])
        tally[phase][1] += 1
        tally[phase][0] += not problems
        failures += [f"{folder} killed at {target[0]} (#{target[1]}): {p}" for p in problems]
        print(f"  killed at {target[0]} (#{target[1]}): {problems[0] if problems else 'ok'}", flush=True)


def history_lines(folder: Path) -> list[str]:
    path = folder / "history.jsonl"
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def _trial_lines(lines: list[str]) -> list[dict]:
    """The trial records among the whole lines of a history (a last line cut by a kill is not one)."""
    records = [json.loads(line) for line in lines if line.endswith("\n")]
    return [r for r in records if r.get("kind") == "trial"]


def redone(before: list[str], events) -> list[str]:
    """Failpoints the resumed process reached inside trials the history held when it started."""
    done = {r["trial"] for r in _trial_lines(before)}
    again = sorted({int(n.split("/")[0].split()[1]) for n, _ in events if n.startswith("trial ")} & done)
    return [f"finished trial {t} run again" for t in again]


def lost(before: list[str], after: list[str]) -> list[str]:
    """Whole history lines of `before` missing from `after` (a cut last line may be dropped)."""
    whole = [line for line in before if line.endswith("\n")]
    return (
        [] if after[: len(whole)] == whole else ["history lines written before the kill changed or vanished"]
    )


def unreadable(folder: Path, killed: bool) -> list[str]:
    """The run files that do not parse; after a kill a cut last history line and FILE.tmp are expected."""
    import onnx
    import onnxruntime as ort
    import torch

    problems = []
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".tmp":
                if not killed:
                    problems.append(f"{path.name} left behind")
            elif path.suffix == ".jsonl":
                lines = path.read_text().splitlines(keepends=True)
                for line in lines[:-1] if killed else lines:
                    json.loads(line)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".onnx":
                model = onnx.load(str(path))
                onnx.checker.check_model(model)
                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                inp = sess.get_inputs()[0]
                sess.run(
                    None,
                    {inp.name: np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], np.float32)},
                )
            elif path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".png":
                if not path.read_bytes().startswith(b"\x89PNG"):
                    raise ValueError("not a PNG")
        except Exception as e:  # noqa: BLE001 - any failure to parse is the finding
            problems.append(
                f"{path.name} does not parse: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
            )
    return problems


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def same_result(reference: Path, folder: Path) -> list[str]:
    """Differences between the chain's finished run and the uninterrupted reference (timing aside)."""
    problems = []
    ref, got = ([_without_timing(r) for r in _trial_lines(history_lines(f))] for f in (reference, folder))
    if ref != got:
        diff = next(
            (i for i, (x, y) in enumerate(zip(ref, got, strict=False)) if x != y), min(len(ref), len(got))
        )
        problems.append(f"trials differ from the uninterrupted run from trial {diff}")
    for name in ("best_widths.json",):
        if (reference / name).is_file() and (reference / name).read_bytes() != _read(folder / name):
            problems.append(f"{name} differs from the uninterrupted run")
    try:
        a, b = (json.loads((f / "result.json").read_text())["best"] for f in (reference, folder))
        for key in ("trial", "widths", "accuracy", "test_accuracy"):
            if a.get(key) != b.get(key):
                problems.append(f"result.json best.{key}: {b.get(key)} vs {a.get(key)} uninterrupted")
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"result.json unreadable: {e}")
    return problems


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _print(tally, failures: list[str]) -> None:
    print(f"\n{'phase':<24} survived / tried")
    for phase, (ok, tried) in tally.items():
        print(f"{phase:<24} {ok:>3} / {tried}")
    ok, tried = sum(v[0] for v in tally.values()), sum(v[1] for v in tally.values())
    print(f"{'all':<24} {ok:>3} / {tried} kills over {len(tally)} phases")
    for f in failures:
        print("FAILED:", f)
    if not failures:
        print("every resumed run finished with the uninterrupted run's trials and best widths")


if __name__ == "__main__":
    t0 = time.perf_counter()
    status = main()
    print(f"({time.perf_counter() - t0:.0f} s)")
    sys.exit(status)
