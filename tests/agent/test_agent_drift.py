"""Input drift on a real agent: a real ONNX model whose artifact carries its calibration summary,
requests over V2 gRPC, the score in ReportedState and a DRIFT event over real mosquitto, and the
Prometheus gauge; an artifact without a summary reports no score (older artifacts keep working)."""

from __future__ import annotations

import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgectl.agent.agent import Agent
from edgectl.artifact import summarize_inputs
from edgectl.artifact.live_sketch import DEFAULT_THRESHOLD
from edgectl.ports import free_port
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, V2Client

CHUNK = 250


def _send(client: V2Client, rng: np.random.Generator, n: int, shift: float = 0.0) -> None:
    for _ in range(n):
        x = rng.standard_normal((1, 4)).astype(np.float32)
        x[:, 2] += shift  # one feature, by one standard deviation of the calibration data
        assert client.infer("mlp", x)[1] == "local"


def _drift_gauge(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.labels["model"], s.labels["version"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgectl_agent_drift_score"
    }


def test_a_one_sd_shift_is_reported_and_raises_one_event_within_2000_requests(rig: AgentRig) -> None:
    rng = np.random.default_rng(11)
    summary = summarize_inputs({"x": rng.standard_normal((2000, 4)).astype(np.float32)})
    art = rig.bundles.build(version=1, input_summary=summary)
    digest = rig.server.add(art.root)
    metrics_port = free_port()
    agent: Agent = rig.agent(metrics_listen=f"127.0.0.1:{metrics_port}")
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=digest, version=1))
    rig.fleet.wait_serving("mlp", digest)
    client = V2Client(agent.address)
    try:
        # In distribution: a score is reported, below the threshold, and no event.
        _send(client, rng, 4 * CHUNK)
        calm = rig.fleet.wait_model("mlp", lambda m: m.drift_requests >= 4 * CHUNK)
        assert 0.0 < calm.drift_score < DEFAULT_THRESHOLD
        assert mpb.EVENT_KIND_DRIFT not in rig.fleet.event_kinds(digest)
        assert 0.0 < _drift_gauge(metrics_port)[("mlp", "1")] < DEFAULT_THRESHOLD
        # Shifted: flagged within 2,000 requests, in the report, the event and the gauge.
        sent = 0
        flagged = None
        while sent < 2000 and flagged is None:
            _send(client, rng, CHUNK, shift=1.0)
            sent += CHUNK
            try:
                flagged = rig.fleet.wait_model(
                    "mlp", lambda m: m.drift_score >= DEFAULT_THRESHOLD, timeout=3.0
                )
            except AssertionError:
                flagged = None
        assert flagged is not None, f"no drift flagged after {sent} shifted requests"
        assert flagged.drift_feature == "x[2]"
        assert _drift_gauge(metrics_port)[("mlp", "1")] >= DEFAULT_THRESHOLD
        rig.fleet.wait_model("mlp", lambda m: m.drift_score >= DEFAULT_THRESHOLD)  # a few more reports
        events = [e for e in rig.fleet.events if e.kind == mpb.EVENT_KIND_DRIFT]
        assert len(events) == 1 and events[0].digest == digest and "x[2]" in events[0].message
    finally:
        client.close()


def test_an_artifact_without_a_summary_serves_and_reports_no_score(rig: AgentRig) -> None:
    art = rig.bundles.build(version=1)
    digest = rig.server.add(art.root)
    metrics_port = free_port()
    agent: Agent = rig.agent(metrics_listen=f"127.0.0.1:{metrics_port}")
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=digest, version=1))
    rig.fleet.wait_serving("mlp", digest)
    client = V2Client(agent.address)
    try:
        _send(client, np.random.default_rng(12), 300, shift=3.0)
    finally:
        client.close()
    rs = rig.fleet.wait_model("mlp", lambda m: m.digest == digest)
    assert rs.drift_requests == 0 and rs.drift_score == 0.0 and rs.drift_feature == ""
    assert _drift_gauge(metrics_port) == {}
    assert mpb.EVENT_KIND_DRIFT not in rig.fleet.event_kinds(digest)
