"""``edgectl_fleet_*``: fleet aggregates computed from what devices report, at scrape time.

Devices behind NAT cannot be scraped; their ReportedState (versions, health, request counts,
p99, burst share, errors) reaches the control plane anyway, so it exports the sums here. Every
replica reads the same store, so every replica reports the same numbers.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgectl.control_plane.fleet import Fleet
from edgectl.protos.v1 import fleet_pb2

log = logging.getLogger(__name__)
# Every name this collector exports (the dashboards' test checks queries against them).
FLEET_METRICS = (
    "edgectl_fleet_devices", "edgectl_fleet_devices_by_version", "edgectl_fleet_devices_by_health",
    "edgectl_fleet_requests_per_second", "edgectl_fleet_errors_per_second", "edgectl_fleet_error_rate",
    "edgectl_fleet_p99_ms", "edgectl_fleet_burst_share", "edgectl_fleet_devices_with_errors",
    "edgectl_fleet_devices_refusing", "edgectl_fleet_drift", "edgectl_fleet_devices_drifting",
    "edgectl_fleet_burst_cost",
)  # fmt: skip
# PSI from which a device counts as drifting (the agents' default --drift-threshold).
DRIFTING = 0.25


def _health(value: int) -> str:
    return (
        fleet_pb2.DeviceHealth.Name(fleet_pb2.DeviceHealth.ValueType(value))
        .removeprefix("DEVICE_HEALTH_")
        .lower()
    )


class FleetCollector(Collector):
    """Reads the inventory on each scrape and folds the online devices' last reports into gauges."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in (
            ("edgectl_fleet_devices", "Devices by connection state", ["state"]),
            ("edgectl_fleet_devices_by_version", "Devices serving each model version", ["model", "version"]),
            ("edgectl_fleet_devices_by_health", "Devices by reported health", ["health"]),
            ("edgectl_fleet_requests_per_second", "Inference requests per second, summed over online devices", []),
            ("edgectl_fleet_errors_per_second", "Failed requests per second, summed over online devices", []),
            ("edgectl_fleet_error_rate", "Failed share of the online devices' requests", []),
            ("edgectl_fleet_p99_ms", "Devices' reported p99 latency: the worst and the median", ["aggregate"]),
            ("edgectl_fleet_burst_share", "Share of the online devices' requests sent to burst", []),
            ("edgectl_fleet_devices_with_errors", "Devices reporting a last error", []),
            ("edgectl_fleet_devices_refusing", "Devices that refused or failed a desired model", []),
            ("edgectl_fleet_drift", "Devices' latest input drift (PSI) per model: the worst and the median",
             ["model", "aggregate"]),
            ("edgectl_fleet_devices_drifting", f"Devices whose latest drift score is >= {DRIFTING}", ["model"]),
            ("edgectl_fleet_burst_cost", "Burst cost of the current budget period, summed over devices", []),
        )}  # fmt: skip
        try:
            devices = self.fleet.list_devices()
        except Exception:
            log.exception("fleet metrics could not read the state store")
            yield from g.values()
            return
        states: Counter[str] = Counter({"online": 0, "offline": 0})
        versions: Counter[tuple[str, str]] = Counter()
        health: Counter[str] = Counter()
        rps = eps = bursts = 0.0
        p99s: list[float] = []
        with_errors = refusing = 0
        drift: dict[str, list[float]] = {}
        burst_cost = 0.0
        for d in devices:
            for m in d.models.values():
                if m.drift is not None:
                    drift.setdefault(m.name, []).append(m.drift)
            burst_cost += float(d.stats.get("burst_cost", 0.0)) if d.stats else 0.0
            states["online" if d.online else "offline"] += 1
            health[_health(d.health)] += 1
            for m in d.models.values():
                if m.digest:
                    versions[(m.name, str(m.version))] += 1
            with_errors += bool(d.last_error)
            refusing += any(m.failed_digest for m in d.models.values())
            if not d.online or not d.stats:
                continue
            window = float(d.stats.get("window_seconds", 0)) or 60.0
            rate = float(d.stats.get("requests", 0)) / window
            rps += rate
            eps += rate * float(d.stats.get("error_rate", 0.0))
            bursts += rate * float(d.stats.get("burst_share", 0.0))
            if d.stats.get("requests"):
                p99s.append(float(d.stats.get("p99_ms", 0.0)))
        for state, n in sorted(states.items()):
            g["edgectl_fleet_devices"].add_metric([state], n)
        for (model, version), n in sorted(versions.items()):
            g["edgectl_fleet_devices_by_version"].add_metric([model, version], n)
        for name, n in sorted(health.items()):
            g["edgectl_fleet_devices_by_health"].add_metric([name], n)
        g["edgectl_fleet_requests_per_second"].add_metric([], rps)
        g["edgectl_fleet_errors_per_second"].add_metric([], eps)
        g["edgectl_fleet_error_rate"].add_metric([], eps / rps if rps else 0.0)
        g["edgectl_fleet_p99_ms"].add_metric(["max"], max(p99s, default=0.0))
        g["edgectl_fleet_p99_ms"].add_metric(["median"], statistics.median(p99s) if p99s else 0.0)
        g["edgectl_fleet_burst_share"].add_metric([], bursts / rps if rps else 0.0)
        g["edgectl_fleet_devices_with_errors"].add_metric([], with_errors)
        g["edgectl_fleet_devices_refusing"].add_metric([], refusing)
        for model, scores in sorted(drift.items()):
            g["edgectl_fleet_drift"].add_metric([model, "max"], max(scores))
            g["edgectl_fleet_drift"].add_metric([model, "median"], statistics.median(scores))
            g["edgectl_fleet_devices_drifting"].add_metric([model], sum(s >= DRIFTING for s in scores))
        g["edgectl_fleet_burst_cost"].add_metric([], burst_cost)
        yield from g.values()
