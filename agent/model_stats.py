"""Per model-version serving statistics in Triton's shape (what perf_analyzer and
``ModelStatistics`` read): request success/failure, queue and compute durations, batch sizes.

Cumulative counters since the version was installed, updated under one lock per version; the
gRPC and HTTP front-ends render the same snapshot.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Duration:
    """A count and the nanoseconds those counted events took, summed."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchStats:
    """Session runs of one batch size (rows): how many, and their summed compute time."""

    batch_size: int
    compute_infer: Duration


@dataclass(frozen=True)
class StatsSnapshot:
    """Everything one version has counted, in Triton's field names."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: tuple[BatchStats, ...] = ()


@dataclass
class _Acc:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def frozen(self) -> Duration:
        return Duration(self.count, self.ns)


@dataclass
class ModelStats:
    """Thread-safe accumulators for one model version."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_ms: int = 0
    _rows: int = 0
    _runs: int = 0
    _acc: dict[str, _Acc] = field(default_factory=dict)
    _batches: dict[int, _Acc] = field(default_factory=dict)

    def _get(self, key: str) -> _Acc:
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = _Acc()
        return acc

    def request(self, ok: bool, total_ns: int, input_ns: int | None = None) -> None:
        """One finished local request: its outcome, end-to-end time and, when its inputs were
        decoded, how long that took."""
        with self._lock:
            self._get("success" if ok else "fail").add(total_ns)
            if input_ns is not None:
                self._get("compute_input").add(input_ns)
            self._last_ms = int(time.time() * 1000)

    def output(self, ns: int) -> None:
        """Encoding one response's outputs took ``ns``."""
        with self._lock:
            self._get("compute_output").add(ns)

    def batch(self, rows: int, requests: int, run_ns: int, queue_ns: int) -> None:
        """One session run of ``rows`` rows for ``requests`` requests that waited ``queue_ns`` in all."""
        with self._lock:
            self._rows += rows
            self._runs += 1
            self._get("queue").add(queue_ns, requests)
            self._get("compute_infer").add(run_ns * requests, requests)
            acc = self._batches.get(rows)
            if acc is None:
                acc = self._batches[rows] = _Acc()
            acc.add(run_ns)

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of every counter."""
        with self._lock:
            get = {k: v.frozen() for k, v in self._acc.items()}
            return StatsSnapshot(
                last_inference_ms=self._last_ms,
                inference_count=self._rows,
                execution_count=self._runs,
                success=get.get("success", Duration()),
                fail=get.get("fail", Duration()),
                queue=get.get("queue", Duration()),
                compute_input=get.get("compute_input", Duration()),
                compute_infer=get.get("compute_infer", Duration()),
                compute_output=get.get("compute_output", Duration()),
                batches=tuple(BatchStats(k, v.frozen()) for k, v in sorted(self._batches.items())),
            )
