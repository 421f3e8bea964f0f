"""Fleet observability: ``edgectl_fleet_*`` from reported states, process metrics and build_info on
both processes, JSON logs on the agent; on `edgectl up` metrics are on without a flag."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgectl.client import ControlPlaneClient, push_artifact, resolve_credentials
from edgectl.control_plane.device_state import Reported, Status
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.metrics import Metrics
from edgectl.control_plane.store import StateStore
from edgectl.endpoints import Endpoints
from edgectl.protos.v1 import mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.agent.onnx_models import mlp_artifact
from tests.harness.upfleet import start_rollout, up_fleet, wait_rollout

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Prometheus text -> {(sample name, sorted labels): value}, with prometheus-client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(where: str) -> Samples:
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def _report(device: str, version: int, requests: int, p99: float, burst: float, errors: float,
            last_error: str = "", health: int = 1) -> Reported:  # fmt: skip
    state = mqtt_pb2.ReportedState(
        device_id=device, health=health, last_error=last_error,  # type: ignore[arg-type]
        models=[mqtt_pb2.ActiveModel(name="det", digest="sha256:" + f"{version}" * 64, version=version,
                                     smoke_test_passed=True)],
        stats=mqtt_pb2.ServingStats(requests=requests, error_rate=errors, p99_ms=p99, burst_share=burst,
                                    window_seconds=60),
    )  # fmt: skip
    return Reported(device, state, time.time())


def test_fleet_aggregates_fold_reported_states(tmp_path: Path) -> None:
    """Versions, states, request and error rates, p99 and burst share, from three reports."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        fleet = Fleet(store)
        fleet.apply([
            _report("a", 1, 600, 10.0, 0.0, 0.0), _report("b", 2, 1200, 30.0, 0.5, 0.1, "disk full", health=3),
            _report("c", 2, 0, 0.0, 0.0, 0.0), Status("a", True, time.time()), Status("b", True, time.time()),
            Status("c", False, time.time()),
        ])  # fmt: skip
        s = parse(generate_latest(Metrics(store, fleet).registry).decode())
    finally:
        store.close()
    assert value(s, "edgectl_fleet_devices", state="online") == 2
    assert value(s, "edgectl_fleet_devices", state="offline") == 1
    assert value(s, "edgectl_fleet_devices_by_version", model="det", version="1") == 1
    assert value(s, "edgectl_fleet_devices_by_version", model="det", version="2") == 2
    assert value(s, "edgectl_fleet_devices_by_health", health="failing") == 1
    assert value(s, "edgectl_fleet_requests_per_second") == 30.0  # (600 + 1200) / 60 s; c is offline
    assert abs(value(s, "edgectl_fleet_errors_per_second") - 2.0) < 1e-9  # 20/s * 0.1
    assert abs(value(s, "edgectl_fleet_burst_share") - (10.0 / 30.0)) < 1e-9
    assert value(s, "edgectl_fleet_p99_ms", aggregate="max") == 30.0
    assert value(s, "edgectl_fleet_p99_ms", aggregate="median") == 20.0
    assert value(s, "edgectl_fleet_devices_with_errors") == 1
    assert ("edgectl_fleet_burst_cost", ()) in s and not any(k[0] == "edgectl_fleet_drift" for k in s)


def test_fleet_drift_and_burst_cost_from_reports(tmp_path: Path) -> None:
    """Per-model drift (worst, median, devices past the alarm level) and the fleet's burst cost;
    a device whose agent reports no drift is left out, not counted as 0."""
    reports = [_report(d, 1, 60, 5.0, 0.1, 0.0) for d in ("a", "b", "c", "old")]
    for r, score in zip(reports, (0.05, 0.1, 0.6), strict=False):
        r.state.models[0].drift_score, r.state.models[0].drift_requests = score, 1000
    for r, cost in zip(reports, (0.1, 0.2, 0.0, 0.0), strict=True):
        r.state.stats.burst_cost = cost
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        fleet = Fleet(store)
        fleet.apply([*reports, *(Status(d, True, time.time()) for d in ("a", "b", "c", "old"))])
        s = parse(generate_latest(Metrics(store, fleet).registry).decode())
    finally:
        store.close()
    assert value(s, "edgectl_fleet_drift", model="det", aggregate="max") == 0.6
    assert value(s, "edgectl_fleet_drift", model="det", aggregate="median") == 0.1
    assert value(s, "edgectl_fleet_devices_drifting", model="det") == 1
    assert abs(value(s, "edgectl_fleet_burst_cost") - 0.3) < 1e-9
    assert value(s, "edgectl_build_info", component="control-plane",
                 version=__import__("edgectl").__version__,
                 python=__import__("platform").python_version()) == 1  # fmt: skip
    assert value(s, "process_resident_memory_bytes") > 0


def test_fleet_metrics_after_a_rollout_on_edgectl_up(tmp_path: Path) -> None:
    """Metrics are on by default in `edgectl up`; after a rollout the control plane counts the new version."""
    with up_fleet(tmp_path) as (data, key):
        endpoints = Endpoints.read(data)
        assert set(endpoints.metrics) == {"control-plane", "cloud", "edge-1", "edge-2"}
        art = mlp_artifact(tmp_path / "art", tmp_path / "models", key, version=1)
        with ControlPlaneClient(
            endpoints.control_plane, credentials=resolve_credentials(data_dir=data)
        ) as client:
            digest = push_artifact(client, art.root).artifact.ref.digest
            done = wait_rollout(client, start_rollout(client, digest, {"tier": "edge"}))
        assert done.state == RP.ROLLOUT_STATE_SUCCEEDED, done
        cp = scrape(endpoints.metrics["control-plane"])
        assert value(cp, "edgectl_fleet_devices_by_version", model="mlp", version="1") == 2
        assert value(cp, "edgectl_fleet_devices", state="online") == 3
        assert value(cp, "edgectl_fleet_devices_by_health", health="ok") == 3
        assert value(cp, "edgectl_rollouts", state="succeeded") == 1
        assert value(cp, "edgectl_wave_duration_seconds_count") == 2
        assert any(name == "edgectl_build_info" and dict(labels)["component"] == "control-plane"
                   for name, labels in cp)  # fmt: skip
        edge = scrape(endpoints.metrics["edge-1"])
        assert value(edge, "edgectl_agent_active_version", model="mlp", digest=digest) == 1
        assert any(
            name == "edgectl_build_info" and dict(labels)["component"] == "agent" for name, labels in edge
        )
        assert value(edge, "process_resident_memory_bytes") > 0
        # the agent logs JSON lines (one object each), as the systemd unit and `edgectl up` ask
        lines = [ln for ln in (data / "logs" / "edge-1.log").read_text().splitlines() if ln.startswith("{")]
        records = [json.loads(ln) for ln in lines]
        assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
