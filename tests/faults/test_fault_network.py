"""Network faults between one device and the servers, through a TCP proxy the test controls."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from edgectl.artifact import TrustStore
from edgectl.ports import free_port
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.sim import make_devices
from tests.faults.conftest import LABELS, MODEL, Artifacts, assert_fleet_verified, ids_of
from tests.faults.proxy import TcpProxy
from tests.harness.fleet import FleetRig, wait_for


@pytest.fixture
def proxies() -> Iterator[list[TcpProxy]]:
    made: list[TcpProxy] = []
    yield made
    for p in made:
        p.close()


def test_device_partitioned_past_the_wave_deadline_then_healed(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore, proxies: list[TcpProxy]
) -> None:
    """Promise: a device cut off from the broker and the control plane for longer than the wave's
    health timeout is skipped (offline policy SKIP), the rollout finishes without it, and when the
    network heals it finds its retained desired state, converges, and serves the new model, verified.
    The other devices are never held up beyond the deadline."""
    rig.push(artifacts.good(1))
    d2 = rig.push(artifacts.good(2))
    mqtt = TcpProxy(rig.broker.host, rig.broker.port)
    api = TcpProxy("127.0.0.1", rig.cp.port)
    proxies += [mqtt, api]
    devices = make_devices(3, "part", LABELS)
    cut_off = devices[2] = dataclasses.replace(devices[2], mqtt=mqtt.url, control_plane=api.address)
    sim = rig.simulate(devices=devices, per_process=3)
    rig.wait_all_online(ids_of(sim))
    mqtt.cut()
    api.cut()
    wait_for(lambda: not rig.devices()[cut_off.device_id].online, 30, what="the partitioned device offline")
    r = rig.rollout(f"{MODEL}:2", LABELS, ["100%"], health_timeout_s=3, offline_policy=RP.OFFLINE_POLICY_SKIP)
    final = rig.wait_done(r.id, 60)
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    states = {d.device_id: d for w in final.waves for d in w.devices}
    assert states[cut_off.device_id].state == RP.DEVICE_ROLLOUT_STATE_SKIPPED
    assert rig.serving(MODEL).get(cut_off.device_id) != d2  # it really was cut off
    mqtt.heal()
    api.heal()
    assert_fleet_verified(rig, sim, trust, d2, timeout=120)
    wait_for(lambda: rig.devices()[cut_off.device_id].online, 30, what="the healed device back online")


def test_download_truncated_and_chunk_corrupted_in_flight(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore, proxies: list[TcpProxy]
) -> None:
    """Promise: a download stream cut short and a chunk whose bytes are altered in flight (below
    TLS-less gRPC, where nothing else checks them) are both caught: the altered chunk fails its
    sha256 and is fetched again, the cut stream resumes from the chunks already stored, and the
    device serves the new model, verified; the old one serves meanwhile."""
    d1 = rig.push(artifacts.good(1, size=1_000_000))
    d2 = rig.push(artifacts.good(2, size=1_000_000))
    api = TcpProxy("127.0.0.1", rig.cp.port)
    proxies.append(api)
    devices = [dataclasses.replace(make_devices(1, "wire", LABELS)[0], control_plane=api.address)]
    sim = rig.simulate(devices=devices, per_process=1, transport="grpc")
    rig.wait_all_online(ids_of(sim))
    r = rig.rollout(f"{MODEL}:1", LABELS, ["100%"], health_timeout_s=60)
    assert rig.wait_done(r.id, 60).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d1)
    base = api.injected.downstream_bytes
    # The cut comes first, inside the first chunks; the flip lands in the resumed stream, which is
    # not cut again (a cut stream's buffered messages never reach the agent, flipped or not).
    api.truncate_after = base + 150_000
    api.flip_at = base + 600_000
    r = rig.rollout(f"{MODEL}:2", LABELS, ["100%"], health_timeout_s=60)
    final = rig.wait_done(r.id, 90)
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    assert_fleet_verified(rig, sim, trust, d2)
    assert api.injected.flipped == 1 and api.injected.truncated == 1
    log = sim.workers[0].log.read_text()
    assert "interrupted" in log, "the cut stream was not noticed"
    assert "corrupt" in log or log.count("interrupted") >= 2, "the altered bytes were not noticed"


def test_site_that_reaches_only_the_broker_gets_the_artifact_over_mqtt(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: a device whose control-plane address cannot be reached (a site that reaches only
    the broker) still converges: it asks the real control plane over MQTT for the signed manifest
    and then the chunks it lacks, verifies them, and serves the model; a later version arrives
    the same way."""
    d1 = rig.push(artifacts.good(1, size=400_000))
    d2 = rig.push(artifacts.good(2, size=400_000))
    unreachable = f"127.0.0.1:{free_port()}"  # nothing listens there
    devices = [
        dataclasses.replace(d, control_plane=unreachable) for d in make_devices(2, "mqtt-only", LABELS)
    ]
    sim = rig.simulate(devices=devices, per_process=2)
    rig.wait_all_online(ids_of(sim))
    for version, digest in ((1, d1), (2, d2)):
        r = rig.rollout(f"{MODEL}:{version}", LABELS, ["100%"], health_timeout_s=60)
        final = rig.wait_done(r.id, 90)
        assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
        assert_fleet_verified(rig, sim, trust, digest)
