"""Prometheus metrics of one agent, and the rolling window behind ReportedState.stats.

Each agent owns its CollectorRegistry, so several agents (tests, `edgectl up`) can live in one
process without clashing.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from edgectl.agent.burst import BudgetSnapshot
from edgectl.build_metrics import add_process_metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class WindowStats:
    """Serving numbers over the last ``window_s`` seconds (the rollout soak gate reads them)."""

    requests: int
    error_rate: float
    p99_ms: float
    burst_share: float
    window_s: int


class StatsWindow:
    """Per-request outcomes over a sliding time window, thread-safe."""

    def __init__(self, window_s: int = 60, max_samples: int = 100_000) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, float, bool, bool]] = collections.deque(
            maxlen=max_samples
        )
        self._lock = threading.Lock()

    def record(self, latency_s: float, ok: bool, burst: bool) -> None:
        with self._lock:
            self._samples.append((time.monotonic(), latency_s, ok, burst))

    def snapshot(self) -> WindowStats:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            samples = list(self._samples)
        if not samples:
            return WindowStats(0, 0.0, 0.0, 0.0, self.window_s)
        lat = sorted(s[1] for s in samples)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        n = len(samples)
        errors = sum(1 for s in samples if not s[2])
        bursts = sum(1 for s in samples if s[3])
        return WindowStats(n, errors / n, p99 * 1000.0, bursts / n, self.window_s)


FLUSH_AFTER = 1024
# Agents whose queued observations passed FLUSH_AFTER, for the one flusher thread of the process:
# applying 1024 of them (~3 ms) on the request that crossed the mark made that request's latency.
_TO_FLUSH: queue.SimpleQueue[AgentMetrics] = queue.SimpleQueue()
_FLUSHER: list[threading.Thread] = []
_FLUSHER_LOCK = threading.Lock()


def _flush_in_background(metrics: AgentMetrics) -> None:
    with _FLUSHER_LOCK:
        if not _FLUSHER:
            _FLUSHER.append(threading.Thread(target=_flusher, name="metrics-flush", daemon=True))
            _FLUSHER[0].start()
    _TO_FLUSH.put(metrics)


def _flusher() -> None:
    while True:
        _TO_FLUSH.get().flush()


class _Flush:
    """A collector that exports nothing: collecting it applies the queued observations first."""

    def __init__(self, flush: Any) -> None:
        self._flush = flush

    def collect(self) -> list[Any]:
        self._flush()
        return []


DriftSource = Callable[[], Iterable[tuple[str, str, float]]]


class _DriftCollector:
    """``edgectl_agent_drift_score{model,version}``, computed from the live sketches when scraped."""

    def __init__(self, source: DriftSource) -> None:
        self._source = source

    def collect(self) -> list[Any]:
        family = GaugeMetricFamily(
            "edgectl_agent_drift_score",
            "Input drift (PSI, worst feature) of live requests against the calibration set",
            labels=["model", "version"],
        )
        for model, version, score in self._source():
            family.add_metric([model, version], score)
        return [family]


class _BudgetCollector:
    """The burst budget's period numbers, read when scraped."""

    def __init__(self, source: Callable[[], BudgetSnapshot]) -> None:
        self._source = source

    def collect(self) -> list[Any]:
        snap = self._source()
        cost = GaugeMetricFamily("edgectl_agent_burst_cost", "Burst cost spent in the current budget period")
        cost.add_metric([], snap.cost)
        held = GaugeMetricFamily(
            "edgectl_agent_burst_held_back",
            "Requests kept from burst this period because the budget is spent",
        )
        held.add_metric([], snap.held_back)
        out = [cost, held]
        if snap.budget is not None:
            budget = GaugeMetricFamily("edgectl_agent_burst_budget", "Burst budget per period")
            budget.add_metric([], snap.budget)
            out.append(budget)
        if snap.grant is not None and snap.grant.period_start:  # the fleet budget's grant, when one is held
            for name, text, value in (
                (
                    "grant",
                    "This agent run's share of the fleet burst budget this period",
                    snap.grant.allowance,
                ),
                ("grant_spent", "Burst cost spent of the fleet budget's grant", snap.grant.spent),
            ):
                family = GaugeMetricFamily(f"edgectl_agent_burst_{name}", text)
                family.add_metric([], value)
                out.append(family)
        return out


class AgentMetrics:
    """Every metric the agent exports; ``serve(host, port)`` exposes them over HTTP."""

    def __init__(self, window_s: int = 60) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The request path only queues its observations (a deque append); they are applied when
        # the registry is read, by this collector registered first, or every FLUSH_AFTER of them
        # by the flusher thread.
        # Applied inline, the five locked updates per request cost ~25 us of a ~500 us round trip.
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._flush_lock = threading.Lock()
        self._flush_asked = False  # a background flush is queued and has not started yet
        r.register(_Flush(self.flush))
        self.requests = Counter(
            "edgectl_agent_requests", "Inference requests", ["model", "served_by", "outcome"], registry=r
        )
        self.latency = Histogram(
            "edgectl_agent_request_latency_seconds",
            "End-to-end ModelInfer latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("edgectl_agent_queue_depth", "Requests waiting", ["model"], registry=r)
        self.batch_size = Histogram(
            "edgectl_agent_batch_size", "Rows per session run", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.run_seconds = Histogram(
            "edgectl_agent_run_seconds",
            "Seconds per session run (one batch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.burst = Counter("edgectl_agent_burst_requests", "Requests sent to burst", ["model"], registry=r)
        self.burst_share = Gauge(
            "edgectl_agent_burst_share", "Share of requests burst over the window", registry=r
        )
        self.active_version = Gauge(
            "edgectl_agent_active_version", "Version serving now", ["model", "digest"], registry=r
        )
        self.fetched_bytes = Counter(
            "edgectl_agent_fetched_bytes", "Artifact bytes downloaded", ["transport"], registry=r
        )
        self.delta_saved_bytes = Counter(
            "edgectl_agent_delta_saved_bytes", "Artifact bytes not downloaded: already held", registry=r
        )
        self.swaps = Counter("edgectl_agent_swaps", "Model swaps", ["model"], registry=r)
        self.refusals = Counter("edgectl_agent_refusals", "Artifacts refused", ["model"], registry=r)
        add_process_metrics(r, "agent")
        self.window = StatsWindow(window_s)
        # Read at scrape time, so /metrics shows the current share without waiting for a report.
        self.burst_share.set_function(lambda: self.window.snapshot().burst_share)
        self._active: dict[str, str] = {}
        # labels() validates and locks on every call; the request path reuses the children instead.
        self._children: dict[tuple[object, ...], Any] = {}
        self._budget_source: Callable[[], BudgetSnapshot] | None = None

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def flush(self) -> None:
        """Apply the queued observations to the Prometheus metrics (reading the registry does)."""
        with self._flush_lock:
            self._flush_asked = False
            while self._pending:
                kind, model, *rest = self._pending.popleft()
                if kind == "request":
                    served_by, ok, latency_s = rest
                    self._child(self.requests, model, served_by, "ok" if ok else "error").inc()
                    self._child(self.latency, model).observe(latency_s)
                    if served_by != "local":
                        self._child(self.burst, model).inc()
                elif kind == "depth":
                    self._child(self.queue_depth, model).set(rest[0])
                else:
                    rows, seconds, queue_depth = rest
                    self._child(self.batch_size, model).observe(rows)
                    self._child(self.run_seconds, model).observe(seconds)
                    self._child(self.queue_depth, model).set(queue_depth)

    def _queue(self, item: tuple[Any, ...]) -> None:
        self._pending.append(item)
        if len(self._pending) >= FLUSH_AFTER and not self._flush_asked:
            self._flush_asked = True
            _flush_in_background(self)

    def observe_request(self, model: str, served_by: str, ok: bool, latency_s: float) -> None:
        """One finished request: counters, histogram, and the soak window."""
        self._queue(("request", model, served_by, ok, latency_s))
        self.window.record(latency_s, ok, served_by != "local")

    def observe_batch(self, model: str, rows: int, seconds: float, queue_depth: int) -> None:
        """One session run of ``rows`` rows that took ``seconds``, and the queue left behind it."""
        self._queue(("batch", model, rows, seconds, queue_depth))

    def set_queue_depth(self, model: str, depth: int) -> None:
        """The requests waiting for ``model`` now (queued in order with the batch observations)."""
        self._queue(("depth", model, depth))

    def set_active(self, model: str, digest: str, version: int) -> None:
        """The active version gauge: one series per model, the old digest removed."""
        old = self._active.get(model)
        if old is not None and old != digest:
            self.active_version.remove(model, old)
        self.active_version.labels(model, digest).set(version)
        self._active[model] = digest

    def watch_budget(self, source: Callable[[], BudgetSnapshot]) -> None:
        """Export the burst budget ``source`` reports at every scrape; ``budget()`` reads it too."""
        self._budget_source = source
        self.registry.register(_BudgetCollector(source))

    def budget(self) -> BudgetSnapshot | None:
        """This period's burst spending, or None when the agent has no burst endpoint."""
        return self._budget_source() if self._budget_source is not None else None

    def watch_drift(self, source: DriftSource) -> None:
        """Export the drift scores ``source`` yields (name, version, PSI) at every scrape."""
        self.registry.register(_DriftCollector(source))

    def stats(self) -> WindowStats:
        return self.window.snapshot()

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
