"""What the console shows, as JSON-ready dicts read in-process from the control plane's domain objects.

Nothing here renders HTML: the browser builds the page with DOM APIs from these dicts, so a
device-reported string (a label, an error) is only ever text. Secrets never enter a view: no
tokens, passwords, signatures' bytes or manifests' raw bytes.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgectl.artifact import Manifest
from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.audit import AuditLog
from edgectl.control_plane.device_state import DeviceRecord
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.rollouts import Rollouts
from edgectl.protos.v1 import fleet_pb2
from edgectl.protos.v1 import rollouts_pb2 as rp

MAX_DEVICES_SHOWN = 1000  # the overview table; counts and the matrix always cover the whole fleet
MAX_MATRIX_ROWS = 50  # label pairs in the version-by-label matrix, the most common first
SPARK_POINTS = 60  # latency samples kept per device for its sparkline
RECENT_ROLLOUTS = 20


def _health(value: int) -> str:
    return (
        fleet_pb2.DeviceHealth.Name(fleet_pb2.DeviceHealth.ValueType(value))
        .removeprefix("DEVICE_HEALTH_")
        .lower()
    )


def _enum(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def versions_of(device: DeviceRecord) -> list[str]:
    """``name:vN`` of every model the device serves, sorted."""
    return sorted(f"{m.name}:v{m.version}" for m in device.models.values() if m.digest)


class LatencyHistory:
    """The last ``SPARK_POINTS`` p99 samples per device, one per report (keyed by its last_seen)."""

    def __init__(self, points: int = SPARK_POINTS) -> None:
        self._points = points
        self._lock = threading.Lock()
        self._series: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, devices: list[DeviceRecord], prune: bool = True) -> None:
        """Add each device's p99 when it reported since the last sample; ``prune``: forget the others."""
        with self._lock:
            for d in devices:
                if d.last_seen is None or "p99_ms" not in d.stats:
                    continue
                series = self._series.setdefault(d.id, deque(maxlen=self._points))
                if not series or series[-1][0] != d.last_seen:
                    series.append((d.last_seen, float(d.stats["p99_ms"])))
            for gone in set(self._series) - {d.id for d in devices} if prune else ():
                del self._series[gone]

    def series(self, device_id: str) -> list[float]:
        """The device's p99 samples, oldest first."""
        with self._lock:
            return [p for _, p in self._series.get(device_id, ())]


def device_row(d: DeviceRecord, history: LatencyHistory) -> dict[str, Any]:
    """One device as the overview table and the device page show it."""
    return {
        "id": d.id,
        "online": d.online,
        "health": _health(d.health),
        "agent_version": d.agent_version,
        "profile": d.profile,
        "labels": d.effective_labels,
        "versions": versions_of(d),
        "last_seen": d.last_seen,
        "last_error": d.last_error,
        "p99_ms": float(d.stats.get("p99_ms", 0.0)),
        "requests": int(d.stats.get("requests", 0)),
        "error_rate": float(d.stats.get("error_rate", 0.0)),
        "burst_share": float(d.stats.get("burst_share", 0.0)),
        "spark": history.series(d.id),
    }


def overview(fleet: Fleet, rollouts: Rollouts, history: LatencyHistory) -> dict[str, Any]:
    """Counts by state, version and label, the version-by-label matrix, the devices and active rollouts."""
    devices = fleet.list_devices()
    history.observe(devices)
    states: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    matrix: dict[str, Counter[str]] = {}
    for d in devices:
        states["online" if d.online else "offline"] += 1
        states[f"health:{_health(d.health)}"] += 1
        served = versions_of(d) or ["(none)"]
        versions.update(served)
        for key, value in d.effective_labels.items():
            pair = f"{key}={value}"
            labels[pair] += 1
            matrix.setdefault(pair, Counter()).update(served)
    columns = sorted(versions)
    # The most common label pairs only: a per-device label (a serial number) would give a row per device.
    shown = sorted(k for k, _n in labels.most_common(MAX_MATRIX_ROWS))
    return {
        "total": len(devices),
        "states": dict(states),
        "versions": dict(versions),
        "labels": dict(labels.most_common(MAX_MATRIX_ROWS)),
        "matrix": {
            "columns": columns,
            "rows": [{"label": k, "counts": [matrix[k][c] for c in columns]} for k in shown],
            "rows_left_out": max(0, len(matrix) - MAX_MATRIX_ROWS),
        },
        "devices": [device_row(d, history) for d in devices[:MAX_DEVICES_SHOWN]],
        "truncated": max(0, len(devices) - MAX_DEVICES_SHOWN),
        "rollouts": [rollout_summary(v) for v in rollouts.list_rollouts(list(rs.ACTIVE), 0, RECENT_ROLLOUTS)],
    }


def wave_rows(view: rs.RolloutView) -> list[dict[str, Any]]:
    """Each wave with its devices counted by state: what the progress bars draw."""
    out = []
    for w in view.waves:
        states = Counter(_enum(rp.DeviceRolloutState, p.state, "DEVICE_ROLLOUT_STATE_") for p in view.devices
                         if p.wave == w.idx)  # fmt: skip
        out.append({"index": w.idx, "state": _enum(rp.WaveState, w.state, "WAVE_STATE_"), "size": w.size,
                    "counts": dict(states), "started_at": w.started_at, "finished_at": w.finished_at})  # fmt: skip
    return out


def rollout_summary(view: rs.RolloutView) -> dict[str, Any]:
    """A rollout's header, gates and waves."""
    r = view.rollout
    s = r.strategy
    return {
        "id": r.id,
        "artifact": f"{r.artifact_name}:v{r.artifact_version}",
        "digest": r.artifact_digest,
        "state": rs.state_name(r.state).lower(),
        "selector": str(r.selector),
        "created_by": r.created_by,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "reason": r.reason,
        "failures": r.failures,
        "current_wave": r.current_wave,
        "gates": {
            "waves": list(s.waves),
            "max_failures": s.max_failures,
            "health_timeout_s": s.health_timeout_s,
            "soak_s": s.soak_s,
            "max_error_rate": s.max_error_rate,
            "max_p99_ms": s.max_p99_ms,
        },
        "waves": wave_rows(view),
        "devices": [
            {
                "id": p.device_id,
                "wave": p.wave,
                "reason": p.reason,
                "state": _enum(rp.DeviceRolloutState, p.state, "DEVICE_ROLLOUT_STATE_"),
            }
            for p in view.devices
        ],
    }


def rollouts_page(rollouts: Rollouts, audit: AuditLog | None) -> dict[str, Any]:
    """Recent rollouts, newest first, each with its event log; the audit trail only for ``audit`` (admins)."""
    items = []
    for view in rollouts.list_rollouts([], 0, RECENT_ROLLOUTS):
        item = rollout_summary(view)
        item["events"] = [{"at": e.at, "kind": e.kind, "wave": e.wave, "device": e.device_id, "message": e.message}
                          for e in rollouts.events_after(view.rollout.id, 0)[-30:]]  # fmt: skip
        items.append(item)
    trail = None
    if audit is not None:
        trail = [{"at": a.at, "identity": a.identity, "action": a.action.rsplit("/", 1)[-1], "target": a.target,
                  "outcome": a.outcome} for a in audit.entries(limit=200) if "RolloutService" in a.action]  # fmt: skip
    return {"rollouts": items, "audit": trail}


def device_page(fleet: Fleet, rollouts: Rollouts, history: LatencyHistory, device_id: str) -> dict[str, Any]:
    """Everything the console knows about one device: models, health, latency, and its rollout events."""
    d = fleet.get(device_id)
    history.observe([d], prune=False)
    row = device_row(d, history)
    row["models"] = [{"name": m.name, "version": m.version, "digest": m.digest, "smoke_test_passed": m.smoke_test_passed,
                      "failed_digest": m.failed_digest, "failure_reason": m.failure_reason, "drift": m.drift}
                     for m in sorted(d.models.values(), key=lambda m: m.name)]  # fmt: skip
    mine = [e for view in rollouts.list_rollouts([], 0, RECENT_ROLLOUTS)
            for e in rollouts.events_after(view.rollout.id, 0) if e.device_id == device_id]  # fmt: skip
    row["events"] = [{"at": e.at, "rollout": e.rollout_id, "kind": e.kind, "message": e.message}
                     for e in sorted(mine, key=lambda e: -e.at)[:50]]  # fmt: skip
    row["generation"] = {"desired": d.generation, "observed": d.observed_generation}
    return row


def _manifest_view(manifest: Manifest) -> dict[str, Any]:
    return {"parent_version": manifest.parent_version, "source_model_sha256": manifest.source_model_sha256,
            "target_profile": manifest.target_profile, "metrics": manifest.metrics, "recipe": manifest.recipe,
            "created": manifest.created}  # fmt: skip


def artifacts_page(artifacts: ArtifactStore) -> dict[str, Any]:
    """Every artifact with its lineage (parent version, source model), metrics, size and signing keys."""
    out = []
    for a in artifacts.list_artifacts("", 0, 200):
        item: dict[str, Any] = {"name": a.name, "version": a.version, "digest": a.digest, "size": a.total_size,
                                "uploaded_at": a.uploaded_at, "uploaded_by": a.uploaded_by,
                                "signed_by": list(a.key_ids), "pinned": a.pinned}  # fmt: skip
        try:
            item.update(_manifest_view(artifacts.manifest(a.digest)))
        except Exception:  # an unreadable manifest is shown as such, the rest of the page stands
            item["manifest_error"] = "manifest unreadable"
        out.append(item)
    return {"artifacts": out}


@dataclass(frozen=True)
class Sources:
    """The domain objects the console reads; ``audit`` is only read for admins."""

    fleet: Fleet
    rollouts: Rollouts
    artifacts: ArtifactStore
    audit: AuditLog


def render(sources: Sources, history: LatencyHistory, page: str, admin: bool) -> dict[str, Any]:
    """The view named ``page``: ``overview``, ``rollouts``, ``artifacts`` or ``device/ID``."""
    pages: dict[str, Callable[[], dict[str, Any]]] = {
        "overview": lambda: overview(sources.fleet, sources.rollouts, history),
        "rollouts": lambda: rollouts_page(sources.rollouts, sources.audit if admin else None),
        "artifacts": lambda: artifacts_page(sources.artifacts),
    }
    if page.startswith("device/"):
        return device_page(sources.fleet, sources.rollouts, history, page.removeprefix("device/"))
    if page not in pages:
        raise KeyError(page)
    return pages[page]()
