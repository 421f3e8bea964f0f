"""The agent's Prometheus metrics stay off the request path: observations are queued, applied
when the registry is read or, past a mark, by a background thread, never by the request."""

from __future__ import annotations

import threading
import time

from edgectl.agent.metrics import FLUSH_AFTER, AgentMetrics


def _requests_counted(metrics: AgentMetrics) -> float:
    """The request counter as applied so far (collected from the metric itself, which, unlike
    reading the registry, does not apply the queued observations first)."""
    return sum(
        s.value for fam in metrics.requests.collect() for s in fam.samples if s.name.endswith("_total")
    )


def test_observations_past_the_mark_are_applied_by_the_flusher_not_the_request() -> None:
    metrics = AgentMetrics()
    applied_on: list[str] = []
    flush = metrics.flush

    def watched() -> None:
        applied_on.append(threading.current_thread().name)
        flush()

    metrics.flush = watched  # type: ignore[method-assign]
    for _ in range(FLUSH_AFTER + 10):
        metrics.observe_request("m", "local", True, 0.001)
    assert "MainThread" not in applied_on, "a request applied the queued observations itself"
    deadline = time.monotonic() + 30
    while _requests_counted(metrics) < FLUSH_AFTER and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _requests_counted(metrics) >= FLUSH_AFTER
    assert applied_on and set(applied_on) == {"metrics-flush"}
    # Reading the registry applies the rest at once.
    got = metrics.registry.get_sample_value(
        "edgectl_agent_requests_total", {"model": "m", "served_by": "local", "outcome": "ok"}
    )
    assert got == FLUSH_AFTER + 10
