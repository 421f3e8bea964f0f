"""What the control plane knows of one device: its row (DeviceRecord), the models it reports
(ModelState), and the observations MQTT ingest decodes (Reported, Status). Data only; the
inventory's behaviour is :mod:`edgectl.control_plane.fleet`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from edgectl.control_plane.db import Row
from edgectl.control_plane.store import dumps, loads
from edgectl.protos.v1 import mqtt_pb2

DEVICE_COLUMNS = (
    "id, labels, reported_labels, created_at, enrolled_at, online, last_seen, agent_version, profile, "
    "health, last_error, observed_generation, models, stats, generation, desired"
)


@dataclass(frozen=True)
class ModelState:
    """One serving name as a device reports it."""

    name: str
    digest: str
    version: int
    smoke_test_passed: bool
    failed_digest: str = ""
    failure_reason: str = ""
    previous_digest: str = ""
    staged_digest: str = ""  # downloaded and verified, waiting for its maintenance window
    drift: float | None = None  # the latest input drift score (PSI); None: the agent reports none
    # A candidate on trial beside the previous version, as ``trial_dict`` writes it (None: none).
    trial: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the device row keeps it."""
        out: dict[str, Any] = {
            "digest": self.digest, "version": self.version, "smoke": self.smoke_test_passed,
            "failed_digest": self.failed_digest, "failure_reason": self.failure_reason,
            "previous_digest": self.previous_digest, "staged_digest": self.staged_digest,
        }  # fmt: skip
        if self.drift is not None:
            out["drift"] = self.drift
        if self.trial is not None:
            out["trial"] = self.trial
        return out

    @classmethod
    def from_dict(cls, name: str, obj: dict[str, Any]) -> ModelState:
        """The inverse of :meth:`to_dict` for the model ``name``."""
        return cls(
            name, obj.get("digest", ""), int(obj.get("version", 0)), bool(obj.get("smoke", False)),
            obj.get("failed_digest", ""), obj.get("failure_reason", ""), obj.get("previous_digest", ""),
            obj.get("staged_digest", ""),
            float(obj["drift"]) if obj.get("drift") is not None else None,
            obj.get("trial"),
        )  # fmt: skip


def trial_dict(trial: mqtt_pb2.TrialStats) -> dict[str, Any]:
    """A reported trial as the device row keeps it (``agreement`` None until something was compared)."""
    return {
        "mode": trial.mode, "canary_percent": trial.canary_percent,
        "current_version": trial.current_version, "candidate_version": trial.candidate_version,
        "compared": trial.compared, "agreement": trial.agreement if trial.compared else None,
        "agreement_kind": trial.agreement_kind, "background_runs": trial.background_runs,
        "background_skipped": trial.background_skipped,
        "versions": {
            str(v.version): {"requests": v.requests, "errors": v.errors, "p50_ms": v.p50_ms,
                             "p95_ms": v.p95_ms, "p99_ms": v.p99_ms}
            for v in trial.versions
        },
    }  # fmt: skip


@dataclass(frozen=True)
class DeviceRecord:
    """A device of the inventory with its last reported state."""

    id: str
    labels: dict[str, str]
    reported_labels: dict[str, str]
    created_at: float
    enrolled_at: float | None
    online: bool
    last_seen: float | None
    agent_version: str
    profile: str
    health: int
    last_error: str
    observed_generation: int
    models: dict[str, ModelState]
    stats: dict[str, float]
    generation: int
    desired: str

    @property
    def effective_labels(self) -> dict[str, str]:
        """What selectors match: the agent's own labels, overridden by the operator's."""
        return {**self.reported_labels, **self.labels}

    @classmethod
    def from_row(cls, row: Row) -> DeviceRecord:
        models = {k: ModelState.from_dict(k, v) for k, v in loads(row[12], {}).items()}
        return cls(
            row[0], loads(row[1], {}), loads(row[2], {}), float(row[3]),
            float(row[4]) if row[4] is not None else None, bool(row[5]),
            float(row[6]) if row[6] is not None else None, row[7], row[8], int(row[9]), row[10],
            int(row[11]), models, loads(row[13], {}), int(row[14]), row[15],
        )  # fmt: skip


class ReportRow(NamedTuple):
    """The columns of a device's row that its reported state sets (all but ``last_seen``)."""

    reported_labels: str
    agent_version: str
    profile: str
    health: int
    last_error: str
    observed_generation: int
    models: str
    stats: str


@dataclass(frozen=True)
class Reported:
    """A decoded ReportedState from a device's reported topic."""

    device_id: str
    state: mqtt_pb2.ReportedState
    received_at: float

    @cached_property
    def row(self) -> ReportRow:
        """What this report writes into the device's row (built once: ingest keeps it to compare)."""
        return report_row(self.state)


def report_row(state: mqtt_pb2.ReportedState) -> ReportRow:
    """The device row's columns as ``state`` sets them: models and stats as the row's JSON."""
    models = {
        m.name: ModelState(
            m.name,
            m.digest,
            m.version,
            m.smoke_test_passed,
            m.failed_digest,
            m.failure_reason,
            m.previous_digest,
            m.staged_digest,
            # drift_requests == 0: no score yet, or an agent or artifact without drift support.
            m.drift_score if m.drift_requests > 0 and math.isfinite(m.drift_score) else None,
            trial_dict(m.trial) if m.HasField("trial") else None,
        ).to_dict()
        for m in state.models
    }
    stats = {
        "requests": state.stats.requests,
        "error_rate": state.stats.error_rate,
        "p99_ms": state.stats.p99_ms,
        "window_seconds": state.stats.window_seconds,
        "burst_share": state.stats.burst_share,
        # Burst spending this budget period (0 from agents without a price or that predate it).
        "burst_cost": state.stats.burst_cost,
        "burst_budget": state.stats.burst_budget,
        "burst_held_back": state.stats.burst_held_back,
        # The fleet budget's grant (control_plane/burst_grants.py); unset by older agents.
        "burst_session": state.stats.burst_session,
        "burst_grant_period": state.stats.burst_grant_period,
        "burst_grant": state.stats.burst_grant,
        "burst_grant_spent": state.stats.burst_grant_spent,
    }
    return ReportRow(
        dumps(dict(state.labels)),
        state.agent_version,
        state.profile,
        int(state.health),
        state.last_error,
        state.observed_generation,
        dumps(models),
        dumps(stats),
    )


@dataclass(frozen=True)
class Status:
    """A decoded DeviceStatus (online, or the Last Will's offline)."""

    device_id: str
    online: bool
    received_at: float
