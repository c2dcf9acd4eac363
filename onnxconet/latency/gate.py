"""One measurer at a time on a machine whose cores also train: a writer-preferring lock between processes.

With several search workers on one machine, a latency measurement taken while the other workers train measures
the contention, not the candidate. `MeasureGate` makes the measurement exclusive: every worker holds the gate
*shared* while it trains or evaluates one batch (`gated(loader, gate)`), and *exclusively* while it measures.
A measurer first takes the turnstile, so no new batch starts, then waits for the batches in flight to end; the
other workers pause until it is done. Two flock(2) files in the run folder, named by host (workers on other
machines share the folder, not the cores): the locks die with their process, so a killed worker never leaves
the gate closed.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MeasureGate:
    """`shared()` around a batch of training, `exclusive()` around a latency measurement (module docstring)."""

    def __init__(self, folder: str | Path, host: str | None = None) -> None:
        host = host or socket.gethostname()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._turnstile = os.open(folder / f".measure-{host}.turnstile", os.O_RDWR | os.O_CREAT, 0o600)
        self._room = os.open(folder / f".measure-{host}.room", os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def shared(self) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_SH)  # blocks while a measurer waits or measures
        try:
            fcntl.flock(self._room, fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._room, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._room, fcntl.LOCK_EX)  # the batches in flight end
            try:
                yield
            finally:
                fcntl.flock(self._room, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._turnstile, self._room):
            try:
                os.close(fd)
            except OSError:
                pass


def run_gate(out: str | Path, latency_target: str = "") -> MeasureGate | None:
    """This machine's gate between the workers of the run in `out`, or None when a --target device measures
    (its agent or runner serializes the measurements itself)."""
    return None if latency_target else MeasureGate(out)


class GatedLoader:
    """`loader`, each batch consumed while holding `gate.shared()` (from the moment it is handed out until the
    next one is asked for). Everything else (len, generator, dataset) is the loader's."""

    def __init__(self, loader, gate: MeasureGate) -> None:
        self.loader, self.gate = loader, gate

    def __iter__(self):
        for batch in self.loader:
            with self.gate.shared():
                yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
