"""The Pareto front of a search's trials: accuracy against the budgeted quantity's ratio."""

from __future__ import annotations

import math
from typing import Any


def as_number(v: Any) -> float | None:
    """`v` as a finite float, else None (None, bool, str, NaN, inf)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def pareto_front(trials: list[dict], x: str = "latency_ratio", y: str = "accuracy") -> list[int]:
    """Indices into `trials` of the non-dominated completed trials, sorted by `x` (then by index).

    Lower `x` and higher `y` are better. Trials whose state is not "complete", or whose `x` or `y` is
    missing or not finite, are ignored. A trial is dominated when another is at least as good on both
    and better on one, so exact duplicates of a front point are all kept; a trial with the same `y`
    as a front point but a larger `x` is dominated.
    """
    points = []
    for i, t in enumerate(trials):
        xv, yv = as_number(t.get(x)), as_number(t.get(y))
        if t.get("state") == "complete" and xv is not None and yv is not None:
            points.append((xv, -yv, i))
    points.sort()  # by x, then best y first, then index
    front: list[int] = []
    best_y, best_x = -math.inf, math.nan
    for xv, neg_y, i in points:
        if -neg_y > best_y:
            front.append(i)
            best_y, best_x = -neg_y, xv
        elif -neg_y == best_y and xv == best_x:  # exact duplicate of the last front point
            front.append(i)
    return front
