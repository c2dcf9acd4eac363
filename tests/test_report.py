"""report.py: the Pareto front on hand-made points, and the files written for full and degenerate results."""

import json
import random

import numpy as np
import pytest

from onnxconet.report import pareto_front, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def t(x, y, state="complete", **kw):
    return {"state": state, "latency_ratio": x, "accuracy": y, **kw}


# ---------------------------------------------------------------- pareto_front


def test_pareto_excludes_dominated_and_sorts_by_x():
    trials = [t(0.9, 0.95), t(0.5, 0.80), t(0.6, 0.70), t(0.3, 0.60), t(0.7, 0.90), t(1.0, 0.94)]
    # (0.6, 0.70) is beaten by (0.5, 0.80); (1.0, 0.94) by (0.9, 0.95)
    assert pareto_front(trials) == [3, 1, 4, 0]


def test_pareto_ties():
    # same x: only the higher y; same y: only the lower x; exact duplicates: both kept
    trials = [t(0.5, 0.8), t(0.5, 0.7), t(0.6, 0.8), t(0.4, 0.6), t(0.4, 0.6)]
    assert pareto_front(trials) == [3, 4, 0]


def test_pareto_ignores_failed_and_incomplete_points():
    trials = [
        t(0.1, 0.99, state="failed"),
        t(None, 0.9),
        t(0.5, None),
        t(float("nan"), 0.95),
        t(0.5, 0.8),
        {"state": "complete"},
    ]
    assert pareto_front(trials) == [4]
    assert pareto_front([]) == []
    assert pareto_front([t(0.1, 0.9, state="failed")]) == []


def test_pareto_other_axes():
    trials = [
        {"state": "complete", "flops_ratio": 0.5, "latency_ratio": 0.9, "accuracy": 0.8},
        {"state": "complete", "flops_ratio": 0.7, "latency_ratio": 0.6, "accuracy": 0.85},
        {"state": "complete", "flops_ratio": 0.6, "latency_ratio": 0.5, "accuracy": 0.7},
    ]
    assert pareto_front(trials, x="flops_ratio") == [0, 1]
    assert pareto_front(trials) == [2, 1]


# ---------------------------------------------------------------- write_report


def make_result(n_trials=12, on="latency", seed=0):
    rng = random.Random(seed)
    groups = [
        {
            "id": i,
            "channels": c,
            "modules": [f"layer{i}.conv", f"layer{i}.bn", f"layer{i + 1}.conv"][: 1 + i % 3],
        }
        for i, c in enumerate([16, 32, 32, 64, 64, 128])
    ]
    base = {
        "accuracy": 0.9312,
        "test_accuracy": 0.9250,
        "latency_ms": 12.34,
        "params": 11_689_512,
        "flops": 1_823_000_000,
        "onnx": "baseline.onnx",
    }
    trials = []
    for k in range(n_trials):
        frac = rng.uniform(0.3, 1.0)
        failed = k == 3
        widths = {str(g["id"]): max(1, int(g["channels"] * frac)) for g in groups}
        trials.append(
            {
                "trial": k,
                "state": "failed" if failed else "complete",
                "widths": widths,
                "accuracy": None if failed else 0.93 - 0.2 * (1 - frac) ** 2 + rng.uniform(-0.02, 0.01),
                "latency_ratio": None if failed else np.float64(0.15 + 0.8 * frac + rng.uniform(-0.05, 0.05)),
                "latency_ms": None if failed else 12.34 * frac,
                "params": int(base["params"] * frac**2),
                "flops": int(base["flops"] * frac**2),
                "flops_ratio": frac**2,
                "seconds": np.float32(3.5 + k),
                "accepted": k % 3 != 1,
                "objective": None,
                "temperature": 1.0 / (k + 1),
                "error": "RuntimeError: CUDA out of memory | while running trial" if failed else None,
            }
        )
    done = [x for x in trials if x["state"] == "complete" and x["latency_ratio"] <= 0.6]
    bt = max(done, key=lambda x: x["accuracy"])
    best = {
        "trial": bt["trial"],
        "widths": bt["widths"],
        "accuracy": bt["accuracy"],
        "test_accuracy": bt["accuracy"] - 0.004,
        "latency_ms": bt["latency_ms"],
        "latency_ratio": float(bt["latency_ratio"]),
        "params": bt["params"],
        "flops": bt["flops"],
        "flops_ratio": bt["flops_ratio"],
        "params_ratio": bt["params"] / base["params"],
        "speedup": 1 / float(bt["latency_ratio"]),
        "max_abs_diff": np.float32(2.4e-6),
        "onnx": "best.onnx",
    }
    return {
        "config": {
            "model": "torchvision:resnet18",
            "data": "digits",
            "strategy": "anneal",
            "budget": "0.6x",
            "budget_on": on,
            "trials": n_trials,
            "epochs_per_trial": 2,
            "final_epochs": 5,
            "seed": seed,
            "provider": "cpu",
        },
        "baseline": base,
        "budget": {"on": on, "ratio": 0.6, "ms": 0.6 * 12.34 if on == "latency" else None},
        "best": best,
        "trials": trials,
        "pareto": [],
        "groups": groups,
        "provider": "CPUExecutionProvider",
        "seconds": 754.2,
        "onnxruntime": "1.31.0",
        "host": "testhost",
    }


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    # IHDR: width and height as big-endian uint32 right after the chunk type
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w >= 600 and h >= 300


def test_write_report_full(tmp_path):
    res = make_result()
    paths = write_report(res, tmp_path / "run")
    assert set(paths) == {"result", "report", "pareto", "widths"}
    assert all(p.is_file() and p.parent == tmp_path / "run" for p in paths.values())
    assert paths["result"].name == "result.json" and paths["report"].name == "report.md"

    back = json.loads(paths["result"].read_text())
    assert back["config"] == res["config"] and back["baseline"] == res["baseline"]
    assert back["trials"][0]["latency_ratio"] == pytest.approx(float(res["trials"][0]["latency_ratio"]))
    assert isinstance(back["trials"][0]["seconds"], float)  # numpy scalars converted
    assert back["trials"][3]["accuracy"] is None
    assert paths["result"].read_text().startswith('{\n "config"')  # indent 1

    md = paths["report"].read_text()
    best = res["best"]
    assert md.startswith("# onnxconet report: torchvision:resnet18")
    assert "**Budget met**" in md and f"{best['latency_ratio']:.3f} ≤ 0.600" in md
    assert "93.1 %" in md and "92.5 %" in md  # baseline val/test accuracy
    assert f"{100 * best['accuracy']:.1f} %" in md
    assert "12.3 ms" in md and "11.7 M" in md and "1.82 G" in md
    assert f"{best['speedup']:.2f}×" in md
    assert f"MACs fell ×{1 / best['flops_ratio']:.2f}" in md and f"latency fell ×{best['speedup']:.2f}" in md
    assert "![accuracy vs latency ratio](pareto.png)" in md and "(widths.png)" in md
    assert "[best.onnx](best.onnx)" in md and "```json" in md
    assert "`layer2.conv`, `layer2.bn` (+1 more)" in md
    assert "CUDA out of memory \\| while" in md  # pipes escaped in table cells
    assert "CPUExecutionProvider" in md and "1.31.0" in md and "testhost" in md and "12 min 34 s" in md
    check_png(paths["pareto"])
    check_png(paths["widths"])


def test_budget_not_met_and_best_none(tmp_path):
    res = make_result()
    res["best"] = None
    paths = write_report(res, tmp_path)
    md = paths["report"].read_text()
    assert "**Budget not met**" in md and "no pruned model" in md.lower()
    assert "lowest was" in md
    assert "widths" not in paths
    check_png(paths["pareto"])

    res = make_result()
    res["best"]["latency_ratio"] = 0.75
    md = write_report(res, tmp_path / "over")["report"].read_text()
    assert "**Budget NOT met**" in md and "0.750 > 0.600" in md


def test_zero_completed_and_minimal(tmp_path):
    res = make_result(n_trials=4)
    for tr in res["trials"]:
        tr.update(state="failed", accuracy=None, latency_ratio=None, error="boom")
    res["best"] = None
    paths = write_report(res, tmp_path / "a")
    md = paths["report"].read_text()
    assert "none of the 4 trials completed" in md
    check_png(paths["pareto"])

    # only what a search that died at once would leave
    paths = write_report({"config": {"model": "m"}, "best": None}, tmp_path / "b")
    assert "**No result**" in paths["report"].read_text()
    assert paths["pareto"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(paths["result"].read_text()) == {"config": {"model": "m"}, "best": None}


def test_budget_on_flops_and_params(tmp_path):
    res = make_result(on="flops")
    paths = write_report(res, tmp_path / "f")
    md = paths["report"].read_text()
    assert "![accuracy vs MACs ratio](pareto.png)" in md
    assert f"MACs ratio {res['best']['flops_ratio']:.3f} ≤ 0.600" in md
    assert "Budget: MACs ≤ 0.6 × baseline (1.09 G of 1.82 G)" in md

    res = make_result(on="params")  # trials carry no params_ratio: derived from params / baseline params
    md = write_report(res, tmp_path / "p")["report"].read_text()
    assert "| params ratio |" in md and "Budget: params ≤ 0.6" in md


def test_logits_history(tmp_path):
    res = make_result()
    res["config"]["strategy"] = "dmasking"
    history = []
    for epoch in range(6):
        probs, options = {}, {}
        for g in res["groups"]:
            c = g["channels"]
            opts = [c // 4, c // 2, 3 * c // 4, c]
            logits = np.array([0.0, epoch * 0.5, epoch * 0.2, 0.0])
            p = np.exp(logits) / np.exp(logits).sum()
            probs[str(g["id"])], options[str(g["id"])] = p.tolist(), opts
        history.append({"epoch": epoch, "probs": probs, "options": options})
    res["logits_history"] = history
    paths = write_report(res, tmp_path)
    check_png(paths["widths"])
    assert "expected width over the search epochs" in paths["report"].read_text()

    res["best"] = None  # the convergence panel alone
    paths = write_report(res, tmp_path / "nobest")
    check_png(paths["widths"])


def test_many_trials_table_is_trimmed(tmp_path):
    res = make_result(n_trials=120)
    md = write_report(res, tmp_path)["report"].read_text()
    assert "Showing " in md and "of 120 trials" in md
    rows = [
        line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    trial_rows = [r for r in rows if r.count("|") >= 9]
    assert 20 <= len(trial_rows) < 120
    assert "**best**" in md


def _latency_block(best_ms_1: float, best_ms_2: float, disturbed: bool = False) -> dict:
    return {
        "method": "isolated-processes",
        "how": "as deployed: each model alone in a fresh process (cpu provider, 2 intra-op threads)",
        "ratio": 0.45, "ratio_p10": 0.44, "ratio_p90": 0.46, "ratios": [0.44, 0.45, 0.45, 0.46],
        "load": 1.2 if disturbed else 0.0, "disturbed": disturbed, "threads": 2,
        "by_threads": {
            "2": {"best_ms": best_ms_2, "baseline_ms": 1.0, "ratio": best_ms_2, "disturbed": False},
            "1": {"best_ms": best_ms_1, "baseline_ms": 1.5, "ratio": best_ms_1 / 1.5, "disturbed": False},
        },
        "fewer_threads_faster": best_ms_1 < 0.95 * best_ms_2,
    }  # fmt: skip


def test_a_budget_inside_the_ratios_confidence_interval_is_said_to_be_within_the_noise(tmp_path):
    from onnxconet.report import noise_note

    lat = {"ratio_ci": [0.281, 0.318], "ratios": [0.29, 0.31, 0.30, 0.28, 0.32, 0.30]}
    note = noise_note(lat, 0.3)
    assert "0.300 lies within" in note and "(0.281–0.318, 6 process pairs)" in note
    assert (
        noise_note(lat, 0.28) == "" and noise_note(lat, 0.32) == ""
    )  # outside the interval: a clear verdict
    assert (
        noise_note({"ratios": [0.3]}, 0.3) == "" and noise_note(lat, None) == ""
    )  # older results: no interval
    res = make_result()
    res["best"]["latency_ratio"] = 0.61
    res["best"]["latency"] = _latency_block(0.6, 0.61) | {"ratio_ci": [0.55, 0.66], "ratios": [0.6] * 8}
    md = write_report(res, tmp_path)["report"].read_text()
    assert "**Budget NOT met**: the best's latency ratio is 0.610 > 0.600. The budget 0.600 lies within" in md
    res["best"]["latency"]["ratio_ci"] = [0.605, 0.62]
    md = write_report(res, tmp_path / "clear")["report"].read_text()
    assert "**Budget NOT met**" in md and "lies within" not in md


def test_latency_section_states_the_method_threads_and_warnings(tmp_path):
    from onnxconet.report import threads_note

    slow_at_one = _latency_block(best_ms_1=0.6, best_ms_2=0.45)
    assert threads_note(slow_at_one) == ""
    fast_at_one = _latency_block(best_ms_1=0.3, best_ms_2=0.45, disturbed=True)
    note = threads_note(fast_at_one)
    assert "faster with 1 intra-op thread" in note and "intra_op_num_threads = 1" in note
    result = make_result()
    result["best"]["latency"] = fast_at_one
    result["deployment"] = "cpu provider, 2 intra-op threads, batch 1, default session options"
    result["baseline"]["latency_drift"] = {"min_ms": 0.36, "max_ms": 0.43, "spread": 0.19, "measurements": 12}
    write_report(result, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Latency as deployed" in md and "as deployed: each model alone" in md
    assert "| intra-op threads | best | baseline | ratio |" in md
    assert note in md  # the 1-thread advice
    assert "other programs kept 1.2 CPUs busy" in md  # the disturbed measurement is called out
    assert "ranged 0.36 ms–0.43 ms (+19%)" in md
    assert "**Warning**: The baseline's latency" in md  # moved > 10 %: the speed of the machine changed
    assert "as deployed (cpu provider, 2 intra-op threads" in md  # the budget line names the deployment
    result["baseline"]["latency_drift"]["spread"] = 0.02
    write_report(result, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "The baseline's latency" in md and "**Warning**: The baseline's latency" not in md
