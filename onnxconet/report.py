"""Outputs of a search run: ``result.json``, ``report.md``, ``pareto.png`` and ``widths.png``.

`write_report` takes the result dict of a search (plain data: it never imports the search, so a
``result.json`` read back from disk renders the same report) and writes:

- ``result.json``: the dict as given, indent 1; numpy scalars/arrays and paths become JSON values,
  NaN/inf become null (strict JSON for ``jq`` and other parsers).
- ``pareto.png``: accuracy (%) of every completed trial against the budget quantity's ratio to the
  baseline (latency, MACs or params, from ``result["budget"]["on"]``); accepted trials filled,
  rejected hollow; the Pareto front as a step line; baseline at ratio 1; the budget as a dashed
  vertical line; the best as a star with its accuracy, ratio and speedup.
- ``widths.png`` (when there is a best or a ``logits_history``): top panel, the best's width of each
  group as a fraction of its full width; bottom panel (dmasking only), each group's expected width
  / full width over the search epochs, from the width probabilities in ``logits_history``.
- ``report.md``: baseline vs best, the realized speedup next to the MACs reduction, the budget
  verdict, the best widths per group, the trials, links to the files, the config, the environment.

The Pareto front drawn and listed is recomputed from the trials on the budget's axis (so the figure,
the table and the axis always agree), not read from ``result["pareto"]``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from onnxconet.files import atomic_write
from onnxconet.search.pareto import as_number as _num
from onnxconet.search.pareto import pareto_front
from onnxconet.search.results import SearchResult

log = logging.getLogger(__name__)

# budget_on -> (ratio key in trials/best, short label, axis label)
_AXES = {
    "latency": ("latency_ratio", "latency ratio", "latency / baseline latency (lower is faster)"),
    "flops": ("flops_ratio", "MACs ratio", "MACs / baseline MACs (lower is cheaper)"),
    "params": ("params_ratio", "params ratio", "params / baseline params (lower is smaller)"),
}
_MAX_TRIAL_ROWS = 40  # above this, the trials table lists the Pareto trials, the best, the first and last
_HEAD_TAIL = 10
_NA = "—"


# ---------------------------------------------------------------- formatting (numbers for humans)


def _jsonable(obj: Any) -> Any:
    """A copy of `obj` made of JSON types: numpy scalars/arrays, paths, tuples and sets converted."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalar or array, without importing numpy
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _sig3(v: float) -> str:
    """Three significant digits without exponent: 1.23, 45.6, 123."""
    a = abs(v)
    return f"{v:.2f}" if a < 10 else f"{v:.1f}" if a < 100 else f"{v:.0f}"


def _count(n: Any) -> str:
    """1234 -> 1.23 k, 11_689_512 -> 11.7 M."""
    v = _num(n)
    if v is None:
        return _NA
    if abs(v) < 1000:
        return f"{v:.0f}"
    for unit, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9)):
        if abs(v) / scale < 999.5:
            return f"{_sig3(v / scale)} {unit}"
    return f"{_sig3(v / 1e12)} T"


def _ms(v: Any) -> str:
    f = _num(v)
    return _NA if f is None else f"{_sig3(f) if f >= 1 else f'{f:.3g}'} ms"


def _pct(acc: Any) -> str:
    f = _num(acc)
    return _NA if f is None else f"{100 * f:.1f} %"


def _ratio(r: Any) -> str:
    f = _num(r)
    return _NA if f is None else f"{f:.3f}"


def _factor(r: Any, what: str) -> str:
    """'MACs fell ×3.02' from a ratio of 0.331 (or 'rose' when the ratio is above 1)."""
    f = _num(r)
    if f is None or f <= 0:
        return f"{what} {_NA}"
    return f"{what} fell ×{1 / f:.2f}" if f <= 1 else f"{what} rose ×{f:.2f}"


def _duration(s: Any) -> str:
    f = _num(s)
    if f is None:
        return _NA
    if f < 60:
        return f"{f:.1f} s"
    if f < 3600:
        return f"{int(f // 60)} min {int(f % 60):02d} s"
    return f"{int(f // 3600)} h {int(f % 3600 // 60):02d} min"


def _cell(s: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(s).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows),
    ]


# ---------------------------------------------------------------- reading the result


def _axis(result: dict) -> str:
    on = (result.get("budget") or {}).get("on") or (result.get("config") or {}).get("budget_on")
    return on if on in _AXES else "latency"


def _with_ratios(trials: list[dict], baseline: dict) -> list[dict]:
    """Copies of the trials with flops_ratio/params_ratio filled from counts where missing."""
    out = []
    for t in trials:
        t = dict(t)
        for q in ("flops", "params"):
            n, base = _num(t.get(q)), _num(baseline.get(q))
            if _num(t.get(f"{q}_ratio")) is None and n is not None and base:
                t[f"{q}_ratio"] = n / base
        out.append(t)
    return out


def _speedup(best: dict) -> float | None:
    s = _num(best.get("speedup"))
    r = _num(best.get("latency_ratio"))
    return s if s is not None else (1 / r if r else None)


def _rel(path: Any, out_dir: Path) -> str:
    """A link target for `path` relative to the report's folder."""
    p = Path(str(path))
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(os.path.relpath(p, out_dir.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return p.as_posix()


def _full_widths(result: dict) -> dict[str, int]:
    return {str(g["id"]): int(g["channels"]) for g in result.get("groups") or [] if "id" in g}


# ---------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_pareto(path: Path, result: dict, trials: list[dict], front: list[int], on: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    key, short, label = _AXES[on]
    base = result.get("baseline") or {}
    best = result.get("best")
    budget = _num((result.get("budget") or {}).get("ratio"))
    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()

    done = [t for t in trials if t.get("state") == "complete"]
    pts = [(_num(t.get(key)), _num(t.get("accuracy")), t.get("accepted")) for t in done]
    pts = [(x, 100 * y, a) for x, y, a in pts if x is not None and y is not None]
    acc = [(x, y) for x, y, a in pts if a is not False]
    rej = [(x, y) for x, y, a in pts if a is False]
    if acc:
        ax.scatter(
            *zip(*acc, strict=True),
            s=22,
            color="C0",
            alpha=0.8,
            label=f"trial, accepted ({len(acc)})",
            zorder=3,
        )
    if rej:
        ax.scatter(
            *zip(*rej, strict=True),
            s=22,
            facecolors="none",
            edgecolors="0.45",
            label=f"trial, rejected ({len(rej)})",
            zorder=2,
        )
    if front:
        fx = [trials[i][key] for i in front]
        fy = [100 * trials[i]["accuracy"] for i in front]
        ax.step(fx, fy, where="post", color="C1", lw=1.6, label=f"Pareto front ({len(front)})", zorder=4)
    base_acc = _num(base.get("accuracy"))
    if base_acc is not None:
        ax.scatter([1.0], [100 * base_acc], marker="s", s=60, color="black", label="baseline", zorder=5)
    if budget is not None:
        ax.axvline(budget, ls="--", color="C3", lw=1.2, label=f"budget: {short} ≤ {budget:.3g}", zorder=1)
    n_failed = sum(t.get("state") != "complete" for t in trials)
    if not pts:
        ax.text(0.5, 0.5, "no completed trial", transform=ax.transAxes, ha="center", va="center", color="0.4")
    if n_failed:
        note = f"{n_failed} failed trial{'s' if n_failed > 1 else ''} not shown"
        ax.text(0.01, 0.98, note, transform=ax.transAxes, va="top", fontsize=8, color="0.4")

    bx, by = (_num(best.get(key)), _num(best.get("accuracy"))) if best else (None, None)
    if bx is not None and by is not None:
        ax.scatter(
            [bx], [100 * by], marker="*", s=320, color="gold", edgecolors="black", zorder=6,
            label=f"best (trial {best.get('trial', '?')})",
        )  # fmt: skip
        text = f"{100 * by:.1f} %, {short} {bx:.3f}"
        sp = _speedup(best)
        if sp is not None:
            text += f"\n{sp:.2f}× faster"
        # put the note on the emptier side: left of the star if it sits in the right half
        x0, x1 = ax.get_xlim()
        right = bx > (x0 + x1) / 2
        ax.annotate(
            text, (bx, 100 * by), xytext=(-20 if right else 20, -38), textcoords="offset points",
            ha="right" if right else "left", va="top", fontsize=9,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6", "alpha": 0.9},
            arrowprops={"arrowstyle": "-", "color": "0.4"}, zorder=7,
        )  # fmt: skip

    cfg = result.get("config") or {}
    title = f"{cfg.get('model', 'model')}: accuracy vs {short}"
    if cfg.get("strategy"):
        title += f" ({cfg['strategy']}, {len(trials)} trials)"
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    atomic_write(path, _png(fig))


def _expected_fractions(
    history: list[dict], full: dict[str, int]
) -> tuple[list[float], dict[str, list[float]]]:
    """Epochs and, per group, expected width / full width at each epoch of a dmasking history."""
    epochs: list[float] = []
    series: dict[str, list[float]] = {}
    options: dict[str, list[float]] = {}
    for k, h in enumerate(history):
        options.update({str(g): [float(w) for w in ws] for g, ws in (h.get("options") or {}).items()})
        epochs.append(_num(h.get("epoch")) if _num(h.get("epoch")) is not None else float(k))
        for g, probs in (h.get("probs") or {}).items():
            g, ws = str(g), options.get(str(g))
            if not ws or len(ws) != len(probs):
                continue
            total = sum(probs) or 1.0
            denom = full.get(g) or max(ws)
            series.setdefault(g, [math.nan] * (len(epochs) - 1))
            series[g].append(sum(p * w for p, w in zip(probs, ws, strict=True)) / total / denom)
        for s in series.values():  # a group missing at this epoch gets a gap
            s.extend([math.nan] * (len(epochs) - len(s)))
    return epochs, series


def _plot_widths(path: Path, result: dict) -> bool:
    """The best's widths per group and, for dmasking, their convergence; False when there is nothing to draw."""
    full = _full_widths(result)
    best = result.get("best") or {}
    widths = {str(g): w for g, w in (best.get("widths") or {}).items() if str(g) in full}
    history = result.get("logits_history") or []
    epochs, series = _expected_fractions(history, full) if history else ([], {})
    panels = [p for p, on in (("bars", widths), ("conv", series)) if on]
    if not panels:
        return False
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6 * len(panels)), dpi=120, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    model = (result.get("config") or {}).get("model", "model")
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "bars":
            gids = sorted(widths, key=lambda g: (len(g), g))  # numeric order for digit ids
            frac = [widths[g] / full[g] for g in gids]
            colors = ["0.7" if f >= 1 else "C0" for f in frac]
            bars = ax.bar(range(len(gids)), frac, color=colors)
            ax.axhline(1.0, color="black", lw=0.8)
            step = max(1, math.ceil(len(gids) / 40))
            ax.set_xticks(range(0, len(gids), step), [gids[i] for i in range(0, len(gids), step)], fontsize=7)
            xlabel = "channel group (id); grey: kept at full width"
            if len(gids) <= 32:
                ax.bar_label(bars, [f"{widths[g]}" for g in gids], fontsize=7, padding=2)
                xlabel += "; above each bar: channels kept"
            ax.set_ylim(0, 1.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("kept / full width")
            ax.set_title(f"{model}: best widths (trial {best.get('trial', '?')})", fontsize=11)
        else:
            cmap = matplotlib.colormaps["viridis"]
            gids = sorted(series, key=lambda g: (len(g), g))
            for j, g in enumerate(gids):
                ax.plot(epochs, series[g], color=cmap(j / max(1, len(gids) - 1)), lw=1.2, label=f"group {g}")
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("search epoch")
            ax.set_ylabel("expected width / full width")
            ax.set_title("width distribution convergence (dmasking)", fontsize=11)
            ax.grid(alpha=0.3)
            if len(gids) <= 10:
                ax.legend(fontsize=7, ncols=2, loc="lower left")
            else:
                ax.text(0.99, 0.02, f"one line per group ({len(gids)})", transform=ax.transAxes,
                        ha="right", fontsize=8, color="0.4")  # fmt: skip
    atomic_write(path, _png(fig))
    return True


# ---------------------------------------------------------------- report.md


def _verdict(result: dict, on: str) -> str:
    """One bold sentence: is the budget met, and if there is no best, why."""
    key, short, _ = _AXES[on]
    trials, best = result.get("trials") or [], result.get("best")
    limit = _num((result.get("budget") or {}).get("ratio"))
    done = [t for t in trials if t.get("state") == "complete"]
    if best is None:
        if not trials:
            return "**No result**: no trial was run, so there is no pruned model."
        if not done:
            return (
                f"**No result**: none of the {len(trials)} trials completed (the errors are in the trials "
                "table), so there is no pruned model."
            )
        if limit is None:
            return "**No result**: the search recorded no best configuration."
        reached = [t for t in done if _num(t.get(key)) is not None]
        msg = f"**Budget not met**: none of the {len(done)} completed trials reached {short} ≤ {limit:.3f}"
        if reached:
            low = min(reached, key=lambda t: t[key])
            msg += f"; the lowest was {low[key]:.3f} (trial {low.get('trial')}, {_pct(low.get('accuracy'))})"
        return msg + ". There is no pruned model; loosen the budget or run more trials."
    v = _num(best.get(key))
    if limit is None:
        return ""  # the budget line already says there is none
    if v is None:
        return f"**Budget verdict unknown**: the best's {short} was not measured (budget {limit:.3f})."
    noise = noise_note(best.get("latency") or {}, limit) if on == "latency" else ""
    if v <= limit * (1 + 1e-9):
        verdict = f"**Budget met**: {short} {v:.3f} ≤ {limit:.3f}."
    else:
        verdict = f"**Budget NOT met**: the best's {short} is {v:.3f} > {limit:.3f}."
    return f"{verdict} {noise}" if noise else verdict


def noise_note(latency: dict, budget: float | None) -> str:
    """One sentence when the budget lies inside the 95 % confidence interval of the measured ratio (another
    measurement of the same files may land on its other side), else ""."""
    ci = latency.get("ratio_ci")
    if budget is None or not ci or not ci[0] <= budget <= ci[1]:
        return ""
    n = len(latency.get("ratios") or [])
    return (
        f"The budget {budget:.3f} lies within the 95 % confidence interval of the measured ratio "
        f"({ci[0]:.3f}–{ci[1]:.3f}, {n} process pairs): another measurement of the same files may land on the "
        "other side of it."
    )


def _resolution_line(result: dict) -> str:
    shape = result.get("input_shape") or []
    base = (result.get("baseline") or {}).get("input_shape") or []
    searched = (result.get("config") or {}).get("resolutions")
    return (
        f"Input resolution searched over {searched}: **{result['resolution']}×{result['resolution']}** chosen; "
        f"the best takes input {tuple(shape)} (the baseline {tuple(base)}), and every ratio is to the baseline "
        "at its own input."
    )


def _budget_line(result: dict, on: str) -> str:
    budget, base = result.get("budget") or {}, result.get("baseline") or {}
    limit = _num(budget.get("ratio"))
    if limit is None:
        return "No budget was given."
    if on == "latency":
        ms = _num(budget.get("ms"))
        if ms is None and _num(base.get("latency_ms")) is not None:
            ms = limit * base["latency_ms"]
        abs_ = f" ({_ms(ms)} of {_ms(base.get('latency_ms'))})" if ms is not None else ""
        where = f" ({result['deployment']})" if result.get("deployment") else ""
        return f"Budget: latency ≤ {limit:.3g} × baseline{abs_} as deployed{where}."
    what = "MACs" if on == "flops" else "params"
    n = _num(base.get(on))
    abs_ = f" ({_count(limit * n)} of {_count(n)})" if n is not None else ""
    return f"Budget: {what} ≤ {limit:.3g} × baseline{abs_}."


def _summary(result: dict) -> list[str]:
    base, best = result.get("baseline") or {}, result.get("best") or {}

    def delta_pt(a: Any, b: Any) -> str:
        fa, fb = _num(a), _num(b)
        return _NA if fa is None or fb is None else f"{100 * (fb - fa):+.1f} pt"

    def ratio(a: Any, b: Any) -> str:
        fa, fb = _num(a), _num(b)
        return _NA if not fa or fb is None else f"{fb / fa:.3f}"

    sp = _speedup(best) if best else None
    rows = [
        ["validation accuracy", _pct(base.get("accuracy")), _pct(best.get("accuracy")),
         delta_pt(base.get("accuracy"), best.get("accuracy"))],
        ["test accuracy", _pct(base.get("test_accuracy")), _pct(best.get("test_accuracy")),
         delta_pt(base.get("test_accuracy"), best.get("test_accuracy"))],
        ["latency", _ms(base.get("latency_ms")), _ms(best.get("latency_ms")), _ratio(best.get("latency_ratio"))],
        ["speedup", "1.00×" if base else _NA, _NA if sp is None else f"{sp:.2f}×", ""],
        ["params", _count(base.get("params")), _count(best.get("params")),
         _ratio(best.get("params_ratio")) if best.get("params_ratio") is not None
         else ratio(base.get("params"), best.get("params"))],
        ["MACs", _count(base.get("flops")), _count(best.get("flops")),
         _ratio(best.get("flops_ratio")) if best.get("flops_ratio") is not None
         else ratio(base.get("flops"), best.get("flops"))],
    ]  # fmt: skip
    if _num(best.get("max_abs_diff")) is not None:
        rows.append(["onnxruntime vs torch, max abs diff", "", f"{best['max_abs_diff']:.2g}", ""])
    lines = _table(["", "baseline", "best", "best / baseline"], rows)
    if best:
        macs = best.get("flops_ratio")
        if _num(macs) is None and _num(base.get("flops")):
            macs = _num(best.get("flops")) / base["flops"] if _num(best.get("flops")) is not None else None
        lat = _num(best.get("latency_ratio"))
        if lat is None and sp:
            lat = 1 / sp
        if lat is None:
            tail = "latency was not measured."
        else:
            tail = f"**{_factor(lat, 'latency')}** (latency as deployed, see below)."
        lines += ["", f"**{_factor(macs, 'MACs')}**, {tail}"]
    race = best.get("race") if best else None
    if race:
        shipped = "the searched widths" if race["challenger_wins"] else "the start (uniform widths)"
        lines += [
            "",
            f"Final race (both fine-tuned alike, McNemar on validation): searched trial {race['challenger']} "
            f"{_pct(race['challenger_accuracy'])} vs start trial {race['anchor']} {_pct(race['anchor_accuracy'])}; "
            f"{race['only_challenger']} images only the searched one gets right, {race['only_anchor']} only the "
            f"start; p = {race['p_value']:.3g} → shipped {shipped}.",
        ]
    elif best and best.get("shipped") == "start":
        lines += [
            "",
            "Shipped: the widths the strategy started from (uniform widths on the budget), not searched ones.",
        ]
    return lines


def threads_note(latency: dict) -> str:
    """One sentence when best.onnx runs faster with 1 thread than at the deployment's thread count, else ""."""
    by = latency.get("by_threads") or {}
    n = str(latency.get("threads"))
    if not latency.get("fewer_threads_faster") or "1" not in by or n not in by:
        return ""
    return (
        f"best.onnx runs faster with 1 intra-op thread ({_ms(by['1']['best_ms'])}) than with {n} "
        f"({_ms(by[n]['best_ms'])}) as deployed: deploy it with SessionOptions.intra_op_num_threads = 1 "
        "(and search with --threads 1)."
    )


def _latency_section(result: dict) -> list[str]:
    """How the best's latency was measured, its spread, and the latency at 1 thread beside the deployment's."""
    lat = (result.get("best") or {}).get("latency")
    if not lat:
        return []
    lines = ["## Latency as deployed", "", f"Measured {lat['how']}."]
    ratios = lat.get("ratios") or []
    if ratios:
        lines[-1] += (
            f" Per-pair ratios {', '.join(f'{r:.3f}' for r in ratios)} (p10–p90 {lat['ratio_p10']:.3f}–"
            f"{lat['ratio_p90']:.3f})."
        )
    if lat.get("disturbed"):
        lines += [
            "",
            f"**Warning**: other programs kept {lat['load']:.1f} CPUs busy during this measurement; a quiet "
            "machine gives another figure. Re-measure with `onnxconet profile best.onnx --compare baseline.onnx "
            f"--isolated --threads {lat['threads']}`.",
        ]
    by = lat.get("by_threads") or {}
    if by:
        rows = [
            [t, _ms(v["best_ms"]), _ms(v["baseline_ms"]), _ratio(v["ratio"])]
            for t, v in sorted(by.items(), key=lambda kv: int(kv[0]))
        ]
        lines += ["", *_table(["intra-op threads", "best", "baseline", "ratio"], rows)]
    note = threads_note(lat)
    if note:
        lines += ["", f"**{note}**"]
    drift = (result.get("baseline") or {}).get("latency_drift")
    if drift:
        text = (
            f"The baseline's latency, measured beside each of {drift['measurements']} candidates during the "
            f"search, ranged {_ms(drift['min_ms'])}–{_ms(drift['max_ms'])} (+{drift['spread']:.0%})."
        )
        if drift["spread"] > 0.10:
            text = (
                f"**Warning**: {text} The machine's speed changed while searching (other load, or a shared "
                "machine whose cores run slower for a while), so trials measured at different times compare "
                "less well; fewer threads or a quiet machine give steadier figures."
            )
        lines += ["", text]
    return lines + [""]


def _widths_table(result: dict) -> list[str]:
    best = result.get("best") or {}
    widths = {str(g): w for g, w in (best.get("widths") or {}).items()}
    groups = {str(g["id"]): g for g in result.get("groups") or [] if "id" in g}
    rows, kept, total = [], 0, 0
    for gid in sorted(set(groups) | set(widths), key=lambda g: (len(g), g)):
        g = groups.get(gid, {})
        mods = list(g.get("modules") or [])
        shown = ", ".join(f"`{m}`" for m in mods[:2]) + (f" (+{len(mods) - 2} more)" if len(mods) > 2 else "")
        full, w = _num(g.get("channels")), _num(widths.get(gid))
        if full and w is not None:
            kept, total = kept + w, total + full
        rows.append(
            [gid, shown or _NA, _count(full), _count(w), _pct(w / full) if full and w is not None else _NA]
        )
    if not rows:
        return ["No channel groups were recorded."]
    lines = _table(["group", "modules", "full", "best", "kept"], rows)
    if total:
        lines += ["", f"Channels kept over these groups: {kept:.0f} of {total:.0f} ({_pct(kept / total)})."]
    return lines


def _trials_table(trials: list[dict], front: list[int], best_trial: Any, on: str) -> list[str]:
    if not trials:
        return ["No trials were run."]
    on_front = set(front)
    picked = range(len(trials))
    note = ""
    if len(trials) > _MAX_TRIAL_ROWS:
        keep = set(range(_HEAD_TAIL)) | set(range(len(trials) - _HEAD_TAIL, len(trials))) | on_front
        keep |= {i for i, t in enumerate(trials) if best_trial is not None and t.get("trial") == best_trial}
        picked = sorted(keep)
        note = (
            f"Showing {len(picked)} of {len(trials)} trials: the first and last {_HEAD_TAIL}, the Pareto front "
            "and the best; every trial is in result.json."
        )
    header = ["trial", "state", "accepted", "accuracy", "latency ratio", "MACs ratio"]
    header += ["params ratio"] if on == "params" else []
    header += ["seconds", "note"]
    rows = []
    for i in picked:
        t = trials[i]
        acc = t.get("accepted")
        notes = ["**best**"] if best_trial is not None and t.get("trial") == best_trial else []
        notes += ["Pareto"] if i in on_front else []
        if t.get("error"):
            err = " ".join(str(t["error"]).split())
            notes.append(err if len(err) <= 80 else err[:77] + "...")
        row = [str(t.get("trial", i)), str(t.get("state", _NA)), _NA if acc is None else ("yes" if acc else "no"),
               _pct(t.get("accuracy")), _ratio(t.get("latency_ratio")), _ratio(t.get("flops_ratio"))]  # fmt: skip
        row += [_ratio(t.get("params_ratio"))] if on == "params" else []
        rows.append(row + [_duration(t.get("seconds")), "; ".join(notes)])
    return ([note, ""] if note else []) + _table(header, rows)


def _markdown(result: dict, trials: list[dict], front: list[int], on: str, paths: dict[str, Path]) -> str:
    cfg, best = result.get("config") or {}, result.get("best")
    out_dir = paths["report"].parent
    n_done = sum(t.get("state") == "complete" for t in trials)
    where = f" on `{cfg['data']}`" if cfg.get("data") else ""
    md = [
        f"# onnxconet report: {cfg.get('model', 'model')}",
        "",
        f"Strategy **{cfg.get('strategy', '?')}**, {len(trials)} trials ({n_done} completed, "
        f"{len(trials) - n_done} failed){where}. {_budget_line(result, on)}",
        "",
        *([_resolution_line(result), ""] if result.get("resolution") else []),
        *([verdict, ""] if (verdict := _verdict(result, on)) else []),
        "## Baseline vs best",
        "",
        *_summary(result),
        "",
        *_latency_section(result),
        "## Best widths per group",
        "",
    ]
    md += _widths_table(result) if best else ["No best configuration, so no widths to show."]
    md += ["", "## Figures", "", f"![accuracy vs {_AXES[on][1]}]({paths['pareto'].name})", ""]
    md += [f"![best widths per group]({paths['widths'].name})", ""] if "widths" in paths else []
    caption = (
        f"`{paths['pareto'].name}`: every completed trial (filled: accepted, hollow: rejected), the Pareto front "
        "(step line), the baseline (square), the budget (dashed line) and the best (star)."
    )
    if "widths" in paths:
        parts = (
            ["the best's width per group as a fraction of full width"] if best and best.get("widths") else []
        )
        parts += (
            ["each group's expected width over the search epochs"] if result.get("logits_history") else []
        )
        caption += f" `{paths['widths'].name}`: " + "; ".join(parts) + "."
    md += [
        caption,
        "",
        "## Trials",
        "",
        *_trials_table(trials, front, best.get("trial") if best else None, on),
        "",
        "## Files",
        "",
    ]
    if best and best.get("onnx"):
        md.append(
            f"- [best.onnx]({_rel(best['onnx'], out_dir)}): the pruned model (widths and metrics in its metadata)"
        )
    else:
        md.append("- no pruned model was written")
    base_onnx = (result.get("baseline") or {}).get("onnx")
    if base_onnx:
        md.append(f"- [baseline ONNX]({_rel(base_onnx, out_dir)})")
    md += [
        f"- [{paths['result'].name}]({paths['result'].name}): every number of this report, and every trial",
        "",
    ]
    md += ["## Config", "", "```json", json.dumps(cfg, indent=1), "```", ""]
    provider = result.get("provider") or cfg.get("provider") or _NA
    md += [
        "---",
        "",
        f"Provider `{provider}` · onnxruntime {result.get('onnxruntime') or _NA} · host {result.get('host') or _NA}"
        f" · total {_duration(result.get('seconds'))}",
        "",
    ]
    return "\n".join(md)


def write_report(result: SearchResult | dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the outputs of a search run into `out_dir` (created if needed).

    Args:
        result: the search result (`search.results.SearchResult`), or a result.json object (config, baseline,
            budget, best, trials, groups, optional logits_history...; see the module docstring): the report
            renders result.json's structure, so a partial one (missing optional keys, ``best=None``) is
            reported as such, never raised on.
        out_dir: folder of the run.

    Returns:
        Paths by name: "result" (result.json), "report" (report.md), "pareto" (pareto.png) and,
        when there is a best or a dmasking history to draw, "widths" (widths.png).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _jsonable(result.to_json() if isinstance(result, SearchResult) else result)
    paths = {"result": out / "result.json", "report": out / "report.md", "pareto": out / "pareto.png"}
    atomic_write(paths["result"], json.dumps(data, indent=1) + "\n")

    on = _axis(data)
    base = data.get("baseline") or {}
    trials = _with_ratios(data.get("trials") or [], base)
    view = dict(data, trials=trials, best=_with_ratios([data["best"]], base)[0] if data.get("best") else None)
    front = pareto_front(trials, x=_AXES[on][0])
    _plot_pareto(paths["pareto"], view, trials, front, on)
    if _plot_widths(out / "widths.png", view):
        paths["widths"] = out / "widths.png"
    atomic_write(paths["report"], _markdown(view, trials, front, on, paths))
    log.info("report written to %s", paths["report"])
    return paths
