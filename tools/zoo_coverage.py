"""Coverage on torchvision's CNN zoo: `onnxconet prune torchvision:NAME --ratio 0.5` for every classifier.

One subprocess per model (the real CLI, with a timeout); prints a table: model, groups, % channels prunable,
FLOPs ratio, params ratio, seconds, status; then totals. Usage:

    python tools/zoo_coverage.py                 # the 68 CNN classifiers (no vit_*, swin_*, maxvit_t)
    python tools/zoo_coverage.py --all           # plus the transformers (they may freeze, never crash)
    python tools/zoo_coverage.py resnet18 googlenet --ratio 0.3 --json out/zoo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torchvision

TRANSFORMERS = ("vit_", "swin_", "maxvit")


def zoo(include_transformers: bool) -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if include_transformers or not n.startswith(TRANSFORMERS)]


def run_one(name: str, ratio: float, timeout: float, workdir: Path) -> dict:
    out = workdir / f"{name}.onnx"
    cmd = [
        sys.executable,
        "-m",
        "onnxconet",
        "prune",
        f"torchvision:{name}",
        "--ratio",
        str(ratio),
        "--out",
        str(out),
        "--json",
    ]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": f"timeout>{timeout:.0f}s", "seconds": time.perf_counter() - t0}
    secs = time.perf_counter() - t0
    for f in workdir.glob(f"{name}.onnx*"):
        f.unlink()
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"model": name, "status": f"exit {p.returncode}: {msg}", "seconds": secs}
    res = json.loads(p.stdout)
    ok = res["output_shape"] == [1, 1000] and res["flops_after"] < res["flops_before"]
    return {
        "model": name,
        "status": "ok" if ok else f"bad output {res['output_shape']}",
        "seconds": secs,
        "groups": res["groups"],
        "prunable_pct": 100.0 * res["prunable_channels"] / max(res["total_channels"], 1),
        "flops_ratio": res["flops_after"] / res["flops_before"],
        "params_ratio": res["params_after"] / res["params_before"],
        "max_abs_diff": res["max_abs_diff"],
        "max_rel_diff": res.get("max_rel_diff"),
        "export_s": res["export_seconds"],
        "groups_s": res["groups_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="subset of model names (default: the whole zoo)")
    ap.add_argument("--all", action="store_true", help="include vit_*, swin_*, maxvit_t")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    names = args.models or zoo(args.all)
    rows = []
    print(
        f"{'model':<28}{'groups':>7}{'prunable%':>10}{'FLOPs':>8}{'params':>8}{'diff':>10}{'rel diff':>10}{'secs':>7}  status",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = run_one(name, args.ratio, args.timeout, Path(tmp))
            rows.append(r)
            if r["status"] == "ok":
                print(
                    f"{name:<28}{r['groups']:>7}{r['prunable_pct']:>10.1f}{r['flops_ratio']:>8.3f}{r['params_ratio']:>8.3f}"
                    f"{r['max_abs_diff']:>10.1e}{r['max_rel_diff']:>10.1e}{r['seconds']:>7.1f}  ok",
                    flush=True,
                )
            else:
                print(
                    f"{name:<28}{'':>7}{'':>10}{'':>8}{'':>8}{'':>10}{'':>10}{r['seconds']:>7.1f}  {r['status']}",
                    flush=True,
                )
    ok = [r for r in rows if r["status"] == "ok"]
    print(f"\n{len(ok)}/{len(rows)} passed; total {sum(r['seconds'] for r in rows) / 60:.1f} min")
    if ok:
        print(
            f"median prunable {sorted(r['prunable_pct'] for r in ok)[len(ok) // 2]:.1f}%, "
            f"median FLOPs ratio {sorted(r['flops_ratio'] for r in ok)[len(ok) // 2]:.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    sys.exit(0 if len(ok) == len(rows) else 1)


if __name__ == "__main__":
    main()
