"""Prometheus metrics: devices and rollouts by state (read from the store at scrape time),
wave durations, and MQTT/gRPC error counters, on a registry of their own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgectl.build_metrics import add_process_metrics
from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.fleet_metrics import FleetCollector
from edgectl.control_plane.store import StateStore
from edgectl.protos.v1 import rollouts_pb2

log = logging.getLogger(__name__)


class _StateCollector(Collector):
    """Gauges computed from the store on each scrape, so every replica reports the same truth."""

    def __init__(self, store: StateStore, fleet: Fleet) -> None:
        self.store = store
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = GaugeMetricFamily(
            "edgectl_devices", "Devices in the inventory by connection state", labels=["state"]
        )
        rollouts = GaugeMetricFamily("edgectl_rollouts", "Rollouts by state", labels=["state"])
        try:
            for state, n in self.fleet.counts().items():
                devices.add_metric([state], n)
            with self.store.tx() as tx:
                by_state = rs.counts(tx)
            for value in rollouts_pb2.RolloutState.values():
                if value:
                    rollouts.add_metric([rs.state_name(value).lower()], by_state.get(value, 0))
        except Exception:
            log.exception("metrics scrape could not read the state store")
        yield devices
        yield rollouts


class Metrics:
    """The control plane's metrics; ``serve`` exposes them over HTTP."""

    def __init__(self, store: StateStore, fleet: Fleet) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(store, fleet))
        self.registry.register(FleetCollector(fleet))
        add_process_metrics(self.registry, "control-plane")
        self.wave_seconds = Histogram(
            "edgectl_wave_duration_seconds", "Time from a wave's start to its success",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=self.registry,
        )  # fmt: skip
        self.mqtt_messages = Counter(
            "edgectl_mqtt_messages", "MQTT messages received by kind", ["kind"], registry=self.registry
        )
        self.mqtt_errors = Counter(
            "edgectl_mqtt_errors", "MQTT errors by kind", ["kind"], registry=self.registry
        )
        self.grpc_errors = Counter(
            "edgectl_grpc_errors", "gRPC calls that failed, by method and code", ["method", "code"],
            registry=self.registry,
        )  # fmt: skip
        self._server: Any = None
        self.port = 0

    def count_mqtt(self, kind: str) -> None:
        if kind in ("bad_payload", "ingest_error"):
            self.mqtt_errors.labels(kind).inc()
        else:
            self.mqtt_messages.labels(kind).inc()

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0: a free port); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
