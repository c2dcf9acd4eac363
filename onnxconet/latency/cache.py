"""Append-only JSONL cache of latency measurements.

One line per measurement: ``{"key": {...}, "stats": {...}}``. The key holds what changes a
latency: the graph (its hash), the provider, threads, batch, input shape, the session config entries, the
onnxruntime version, the host and the measurement method (figures of another method never answer a query). Lines are only ever appended, so a crash loses at most the line being written; a
later line for the same key wins, and a corrupt line is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import onnx

from onnxconet.errors import LatencyError
from onnxconet.latency.process import onnx_tensors
from onnxconet.latency.profile import ISOLATED, LatencyStats, ModelLike, Target, measure

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _hash_file(h: Any, path: str) -> bool:
    """Feed the file to `h`; return whether it contains b"location" (external data reference key)."""
    found, tail = False, b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            found = found or b"location" in tail + chunk[:16] or b"location" in chunk
            tail = chunk[-16:]
    return found


def _external_files(path: str) -> list[str]:
    """Sorted external data files referenced by the model at `path` (weights are not loaded)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise LatencyError(f"cannot read ONNX file {path}: {e}; re-export it") from e
    base = os.path.dirname(path)
    files = set()
    for t in onnx_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                files.add(os.path.join(base, loc))
    return sorted(files)


def graph_hash(model: ModelLike) -> str:
    """SHA-256 (hex) of a serialized model.

    For a path the file bytes are hashed (streamed), plus each external data file it references
    (name and bytes), so re-saving the same weights elsewhere keeps the hash while changing them
    does not. Any change to the file (even a doc string) changes the hash: it can only cause a
    cache miss, never a wrong hit.

    Args:
        model: ONNX bytes, a path, or a ModelProto (serialized deterministically).

    Raises:
        LatencyError: the file or one of its external data files is missing or unreadable.
    """
    h = hashlib.sha256()
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        try:
            maybe_external = _hash_file(h, path)
            for ext in _external_files(path) if maybe_external else []:  # skip parsing when none
                h.update(b"\0" + os.path.relpath(ext, os.path.dirname(path)).encode() + b"\0")
                _hash_file(h, ext)
        except OSError as e:
            raise LatencyError(f"cannot hash model {path}: {e.strerror or e}: {e.filename}") from e
    elif isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= 2**31 - 1:
            raise LatencyError("model is > 2 GB; save it with external data and hash the file path")
        h.update(model.SerializeToString(deterministic=True))
    elif isinstance(model, (bytes, bytearray, memoryview)):
        h.update(model)
    else:
        raise LatencyError(
            f"cannot hash a model given as {type(model).__name__}; pass bytes, a path or a ModelProto"
        )
    return h.hexdigest()


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


class LatencyCache:
    """Latency measurements keyed by `LatencyCache.key`, stored as an append-only JSONL file.

    The file is read once, on first use. Appends from several threads of one process are safe
    (one write per line under a lock); appends from several processes on a local disk are too in
    practice (O_APPEND, one write() per line), but each process only sees its own later lines.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, LatencyStats] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def key(graph_hash: str, target: Target, input_shape: Any, provider: str, method: str = ISOLATED) -> dict:
        """Cache key of one measurement.

        Args:
            graph_hash: `graph_hash` of the model.
            target: its resolved thread count and batch enter the key.
            input_shape: the input shape timed, or None when it is the model's own (the graph
                hash then fixes it).
            provider: the provider asked ("auto", "cpu", ...) or really used ("CPUExecutionProvider");
                callers must be consistent (`cached_measure` uses the one asked, with the host in
                the key it resolves the same way).
            method: how it was measured (`profile.ISOLATED`, `profile.PAIRED`).
        """
        shape = None if input_shape is None else [int(d) for d in input_shape]
        key = {
            "graph": graph_hash,
            "provider": provider,
            "threads": target.resolved_threads,
            "batch": target.batch,
            "input_shape": shape,
            **target.on().cache_fields(),  # host and onnxruntime of the device (and its URL when remote)
            "method": method,
        }
        if target.session_config:
            key["config"] = dict(target.session_config)
        return key

    def _load(self) -> dict[str, LatencyStats]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, LatencyStats] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        entries[_canonical(rec["key"])] = LatencyStats.from_dict(rec["stats"])
                    except (ValueError, KeyError, TypeError, AttributeError) as e:
                        why = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                        log.warning("%s:%d: skipped corrupt latency cache line (%s)", self.path, lineno, why)
        self._entries = entries
        log.debug("latency cache %s: %d entries", self.path, len(entries))
        return entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._load())

    def get(self, key: dict) -> LatencyStats | None:
        """The stats stored for `key` (the last line written for it), or None."""
        with self._lock:
            return self._load().get(_canonical(key))

    def put(self, key: dict, stats: LatencyStats) -> None:
        """Append one line for `key` and make it durable (flush + fsync)."""
        line = json.dumps({"key": key, "stats": stats.to_dict()}, sort_keys=True) + "\n"
        with self._lock:
            entries = self._load()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # A process killed mid-write leaves a line without "\n": start on a fresh line.
                if self.path.exists() and self.path.stat().st_size:
                    with open(self.path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            line = "\n" + line
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode("utf-8"))  # one write(): appends do not interleave
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise LatencyError(f"cannot append to latency cache {self.path}: {e.strerror or e}") from e
            entries[_canonical(key)] = stats


def cached_measure(model: ModelLike, target: Target, cache: LatencyCache | None, **kw: Any) -> LatencyStats:
    """`measure` through a cache: a hit returns the stored stats at once, a miss measures and stores.

    The key uses the provider asked (`target.provider`): the host and onnxruntime version are in
    the key, so "auto" resolves the same way on a later call. A hit that fell back to another
    provider raises under `target.strict`, as a fresh measurement would.

    Args:
        model: ONNX bytes, path or ModelProto.
        target: where to run.
        cache: None to always measure.
        **kw: passed to `measure` (warmup, min_runs, max_runs, max_seconds, rel_ci).
    """
    if cache is None:
        return measure(model, target, **kw)
    shape = None if target.input_shape is None else (target.batch, *target.input_shape[1:])  # as timed
    key = LatencyCache.key(graph_hash(model), target, shape, target.provider)
    stats = cache.get(key)
    if stats is not None:
        if target.strict and stats.fallback:
            raise LatencyError(
                f"cached measurement fell back ({stats.fallback}); drop strict or fix the provider"
            )
        log.debug("latency cache hit: %.3f ms", stats.median_ms)
        return stats
    stats = measure(model, target, **kw)
    cache.put(key, stats)
    return stats
