"""Failpoints: named moments of a run where tools/fault_inject.py kills the process, to prove that a killed search
resumes without losing or redoing finished work.

Off unless the environment asks (one dict lookup per point otherwise):
    ONNXCONET_FAULT=NAME:N      SIGKILL this process the Nth time it reaches the point NAME (N >= 1)
    ONNXCONET_FAULT_LOG=FILE    append the name of every point reached to FILE, one per line (the census)

A point's name is "<phase>/<what>": the phase is set by `phase()` around a part of the run ("setup", "trial 3",
"finish", "report"), so names of later trials never repeat those of earlier ones, and a resumed process reaches
the same names as an uninterrupted run from where it resumes. `files` writes with a point in the middle of the
bytes ("<phase>/write:<file>", the first half on disk, the rest not) while faults are on.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

ENV, LOG_ENV = "ONNXCONET_FAULT", "ONNXCONET_FAULT_LOG"
_counts: Counter[str] = Counter()
_phase = ["setup"]


def active() -> bool:
    return bool(os.environ.get(ENV) or os.environ.get(LOG_ENV))


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Points reached inside the block are named "<name>/<what>"."""
    _phase.append(name)
    try:
        yield
    finally:
        _phase.pop()


def point(what: str) -> None:
    """A failpoint: logged to the census, and the process killed here when ONNXCONET_FAULT names it."""
    spec, log = os.environ.get(ENV), os.environ.get(LOG_ENV)
    if not (spec or log):
        return
    name = f"{_phase[-1]}/{what}"
    _counts[name] += 1
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if spec and parse(spec) == (name, _counts[name]):
        os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str) -> tuple[str, int]:
    """ "NAME:N" -> (NAME, N); a bare NAME is its first occurrence."""
    name, sep, n = spec.rpartition(":")
    if sep and n.isdigit() and int(n) >= 1:
        return name, int(n)
    return spec, 1
