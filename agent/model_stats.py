"""Per model-version serving statistics in Triton's shape (what perf_analyzer and
``ModelStatistics`` read): request success/failure, queue and compute durations, batch sizes.

Cumulative counters since the version was installed, updated under one lock per version; the
gRPC and HTTP front-ends render the same snapshot.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


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


class ModelStats:
    """Thread-safe accumulators for one model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._rows = 0
        self._runs = 0
        # One attribute per counter: the request path updates them with no lookups by name.
        self._success, self._fail, self._queue = _Acc(), _Acc(), _Acc()
        self._input, self._infer, self._output = _Acc(), _Acc(), _Acc()
        self._batches: dict[int, _Acc] = {}

    def request(self, ok: bool, total_ns: int, input_ns: int | None = None) -> None:
        """One finished local request: its outcome, end-to-end time and, when its inputs were
        decoded, how long that took."""
        with self._lock:
            acc = self._success if ok else self._fail
            acc.count += 1
            acc.ns += total_ns
            if input_ns is not None:
                self._input.count += 1
                self._input.ns += input_ns
            self._last_ms = int(time.time() * 1000)

    def output(self, ns: int) -> None:
        """Encoding one response's outputs took ``ns``."""
        with self._lock:
            self._output.count += 1
            self._output.ns += ns

    def batch(self, rows: int, requests: int, run_ns: int, queue_ns: int) -> None:
        """One session run of ``rows`` rows for ``requests`` requests that waited ``queue_ns`` in all."""
        with self._lock:
            self._rows += rows
            self._runs += 1
            self._queue.add(queue_ns, requests)
            self._infer.add(run_ns * requests, requests)
            acc = self._batches.get(rows)
            if acc is None:
                acc = self._batches[rows] = _Acc()
            acc.count += 1
            acc.ns += run_ns

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of every counter."""
        with self._lock:
            return StatsSnapshot(
                last_inference_ms=self._last_ms,
                inference_count=self._rows,
                execution_count=self._runs,
                success=self._success.frozen(),
                fail=self._fail.frozen(),
                queue=self._queue.frozen(),
                compute_input=self._input.frozen(),
                compute_infer=self._infer.frozen(),
                compute_output=self._output.frozen(),
                batches=tuple(BatchStats(k, v.frozen()) for k, v in sorted(self._batches.items())),
            )
