"""What the agent tells the control plane: its reported state (models, health, serving stats,
canary trials, input drift) and its events. The reconcile loop decides; this module words it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

import edgectl
from edgectl.agent.canary import Trials, fill_trial
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.serving import ModelRegistry, ServedModel
from edgectl.agent.staging import SwapWindows
from edgectl.agent.state import AgentState
from edgectl.protos.v1 import fleet_pb2 as fpb
from edgectl.protos.v1 import mqtt_pb2 as mpb

Kind = mpb.EventKind


class Reporter(Protocol):
    """Where reports and events go (the MQTT link; a list in tests)."""

    def report(self, state: mpb.ReportedState) -> None: ...

    def event(self, event: mpb.DeviceEvent) -> None: ...


class FetchProgress:
    """Which moments of a download become FETCH_PROGRESS events: each quarter of the artifact
    crossed, but no sooner than ``interval_s`` after the previous one (or the fetch's start). A
    fetch so sends at most three whatever the artifact's size, a quick one none; its end is the
    STAGED event. Every event is a message the control plane receives, so this keeps its cost per
    device flat as artifacts grow."""

    STEPS = 4

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self._step = 0

    def due(self, done: int, total: int) -> bool:
        """True when ``done`` of ``total`` bytes should be reported now."""
        if total <= 0 or done >= total:
            return False
        step = done * self.STEPS // total
        if step <= self._step:
            return False
        now = self._clock()
        if now - self._last < self.interval_s:
            return False  # the quarter is reported at the first call after the interval, if still due
        self._step, self._last = step, now
        return True


class RepeatedReports:
    """Whether a heartbeat's report goes out: one that says anything new (all but its timestamp)
    at once; one that would repeat the last sent only once ``idle_s`` has passed since. The
    broker's keepalive and the Will say whether the device lives, and each repeat costs the control
    plane a message it only takes a time from."""

    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self._clock = clock
        self._last: tuple[bytes, float] | None = None  # (content, clock) of the last report sent

    @staticmethod
    def content(report: mpb.ReportedState) -> bytes:
        """What a report says, its timestamp left out: two reports that say the same compare equal."""
        copy = mpb.ReportedState()
        copy.CopyFrom(report)
        copy.ClearField("reported_at")
        return copy.SerializeToString(deterministic=True)

    def due(self, content: bytes) -> bool:
        last = self._last
        return last is None or last[0] != content or self._clock() - last[1] >= self.idle_s

    def sent(self, content: bytes) -> None:
        self._last = (content, self._clock())


class StateReports:
    """Builds the ReportedState and DeviceEvents of one device and hands them to its Reporter."""

    def __init__(
        self,
        device_id: str,
        profile: str,
        labels: dict[str, str],
        drift_threshold: float,
        metrics: AgentMetrics,
        registry: ModelRegistry,
        reporter: Reporter,
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.labels = labels
        self.drift_threshold = drift_threshold
        self.metrics = metrics
        self.registry = registry
        self.reporter = reporter

    def build(
        self, state: AgentState, swaps: SwapWindows, trials: Trials | None, last_error: str
    ) -> mpb.ReportedState:
        """The device's reported state now; raises a DRIFT event when a model's score crosses the threshold."""
        stats = self.metrics.stats()
        now = Timestamp()
        now.GetCurrentTime()
        rs = mpb.ReportedState(
            device_id=self.device_id,
            observed_generation=state.observed_generation,
            agent_version=edgectl.__version__,
            profile=self.profile,
            labels=self.labels,
            last_error=last_error,
            reported_at=now,
            stats=mpb.ServingStats(
                requests=stats.requests,
                error_rate=stats.error_rate,
                p99_ms=stats.p99_ms,
                burst_share=stats.burst_share,
                window_seconds=stats.window_s,
            ),
        )
        budget = self.metrics.budget()
        if budget is not None:
            rs.stats.burst_cost, rs.stats.burst_held_back = budget.cost, budget.held_back
            rs.stats.burst_budget = budget.budget or 0.0
            if budget.grant is not None:  # what the control plane's fleet budget needs to refill grants
                g = budget.grant
                rs.stats.burst_session, rs.stats.burst_grant_period = g.session, g.period_start
                rs.stats.burst_grant, rs.stats.burst_grant_spent = g.allowance, g.spent
                rs.stats.burst_request_price = budget.request_price
        failing = False
        for name, slot in sorted(state.models.items()):
            served = self.registry.get(name)
            rs.models.add(
                name=name,
                digest=slot.active.digest if slot.active else "",
                version=slot.active.version if slot.active else 0,
                smoke_test_passed=slot.smoke_test_passed and served is not None,
                previous_digest=slot.previous.digest if slot.previous else "",
                execution_provider=served.model.provider if served else "",
                failed_digest=slot.failed_digest,
                failure_reason=slot.failure_reason,
                staged_digest=swaps.waiting_digest(name),
            )
            report = trials.report(name) if trials is not None else None
            if report is not None:
                fill_trial(rs.models[-1].trial, report)
            failing |= bool(slot.failed_digest) or (slot.active is not None and served is None)
            self._drift(rs.models[-1], served)
        failing |= bool(rs.last_error)
        rs.health = fpb.DEVICE_HEALTH_DEGRADED if failing else fpb.DEVICE_HEALTH_OK
        return rs

    def _drift(self, active: mpb.ActiveModel, served: ServedModel | None) -> None:
        """Fill the model's drift fields, and raise a DRIFT event when its score crosses the threshold."""
        if served is None or served.drift is None:
            return
        score, threshold = served.drift.score(), self.drift_threshold
        if score is not None:
            active.drift_score, active.drift_requests, active.drift_feature = score.score, score.requests, score.feature  # fmt: skip
        if score is not None and served.drift.alarm(threshold) is not None:
            self.event(
                Kind.EVENT_KIND_DRIFT, served.model.digest, score.describe(served.model.name, threshold)
            )

    def event(
        self, kind: mpb.EventKind.ValueType, digest: str, message: str, done: int = 0, total: int = 0
    ) -> None:
        """Send one DeviceEvent (progress carries bytes done of total)."""
        now = Timestamp()
        now.GetCurrentTime()
        self.reporter.event(
            mpb.DeviceEvent(
                device_id=self.device_id,
                kind=kind,
                digest=digest,
                message=message,
                at=now,
                bytes_done=done,
                bytes_total=total,
            )
        )
