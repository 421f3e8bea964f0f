"""Rollouts end to end: real gRPC, real mosquitto, simulated devices with their own connections."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from edgectl.artifact import Artifact, SigningKey
from edgectl.broker import MosquittoProcess
from edgectl.client import ControlPlaneClient, push_artifact
from edgectl.control_plane.server import ControlPlane
from edgectl.ports import free_port, wait_for_port
from edgectl.protos.v1 import common_pb2, fleet_pb2, mqtt_pb2, rollouts_pb2
from tests.control_plane.sim_device import SimFleet, wait_for

RP = rollouts_pb2


def create(client: ControlPlaneClient, artifact: str, selector: dict[str, str], waves: list[str],
           max_failures: str = "0", timeout: int = 5) -> rollouts_pb2.Rollout:  # fmt: skip
    request = RP.CreateRolloutRequest(
        artifact=artifact,
        selector=common_pb2.Selector(match_labels=selector),
        strategy=RP.Strategy(waves=waves, max_failures=max_failures, health_timeout_seconds=timeout),
    )
    return client.rollouts.Create(request, timeout=10)


def watch_until_done(
    client: ControlPlaneClient, rollout_id: str, timeout: float = 60
) -> list[RP.RolloutEvent]:
    """Every event of the rollout, read from the Watch stream until it ends."""
    return list(client.rollouts.Watch(RP.WatchRolloutRequest(id=rollout_id), timeout=timeout))


def fleet_of(sim: SimFleet, n: int, digest: str = "", version: int = 1, bad: set[str] | None = None,
             labels: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    ids = [f"dev-{i:03d}" for i in range(n)]
    for i in ids:
        device = sim.add(i, labels or {"site": "lab"}, bad_digests=bad or set())
        if digest:
            device.active["digits"] = mqtt_pb2.ActiveModel(
                name="digits", digest=digest, version=version, smoke_test_passed=True
            )
    sim.connect(ids)
    return ids


def test_three_wave_rollout_over_twenty_devices_completes(
    cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    old, new = push(build(version=1)), push(build(version=2))
    ids = fleet_of(sim, 20, old)
    wait_for(lambda: len(client.fleet.ListDevices(fleet_pb2.ListDevicesRequest()).devices) == 20, 10,
             what="20 devices in the inventory")  # fmt: skip
    rollout = create(client, "digits:2", {"site": "lab"}, ["1", "25%", "100%"])
    assert [len(w.devices) for w in rollout.waves] == [1, 4, 15]
    events = watch_until_done(client, rollout.id)
    final = client.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    assert set(sim.digests("digits").values()) == {new}
    kinds = [e.kind for e in events]
    assert kinds.count("wave_started") == 3 and kinds.count("wave_succeeded") == 3
    assert sorted(e.device_id for e in events if e.kind == "device_healthy") == ids
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})
    # the canary wave finished before the second wave started
    order = [(e.kind, e.wave) for e in events if e.kind.startswith("wave_")]
    assert order == [("wave_started", 0), ("wave_succeeded", 0), ("wave_started", 1), ("wave_succeeded", 1),
                     ("wave_started", 2), ("wave_succeeded", 2)]  # fmt: skip
    assert all(d.state == RP.DEVICE_ROLLOUT_STATE_HEALTHY and d.previous_digest == old
               for w in final.waves for d in w.devices)  # fmt: skip


def test_failing_wave_stops_and_rolls_back_moved_devices(
    cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    old = push(build(version=1))
    bad_build = build(version=2)
    new = bad_build.digest
    ids = [f"dev-{i:03d}" for i in range(10)]
    # The canary (first id, online first then by id) passes; every other device fails the smoke test.
    for i in ids:
        device = sim.add(i, {"site": "lab"}, bad_digests=set() if i == ids[0] else {new})
        device.active["digits"] = mqtt_pb2.ActiveModel(
            name="digits", digest=old, version=1, smoke_test_passed=True
        )
    sim.connect(ids)
    push(bad_build)
    wait_for(
        lambda: len(cp.fleet.list_devices()) == 10 and all(d.online for d in cp.fleet.list_devices()),
        10,
        what="devices online",
    )
    rollout = create(client, "digits:2", {"site": "lab"}, ["1", "50%", "100%"], max_failures="1")
    events = watch_until_done(client, rollout.id)
    final = client.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
    assert final.state == RP.ROLLOUT_STATE_FAILED and "failure budget" in final.reason
    kinds = [e.kind for e in events]
    assert kinds.count("rollback_started") == 1 and "wave_started" in kinds
    assert kinds.count("wave_started") == 2, "the third wave must never start"
    # every device that was moved is back on the old digest; the last wave was never touched
    assert set(sim.digests("digits").values()) == {old}
    states = {d.device_id: d.state for w in final.waves for d in w.devices}
    moved = [i for i, s in states.items() if s == RP.DEVICE_ROLLOUT_STATE_ROLLED_BACK]
    assert sorted(moved) == ids[:5]
    assert all(states[i] == RP.DEVICE_ROLLOUT_STATE_SKIPPED for i in ids[5:])
    received = sim.snapshot(lambda devs: {i: d.desired_received for i, d in devs.items()})
    assert all(received[i] == 0 for i in ids[5:])


def test_pause_resume_abort_and_state_errors(
    cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    push(build(version=1))
    fleet_of(sim, 4)
    wait_for(lambda: len(cp.fleet.list_devices()) == 4, 10, what="devices registered")
    rollout = create(client, "digits", {"site": "lab"}, ["1", "100%"])
    paused = client.rollouts.Pause(RP.RolloutActionRequest(id=rollout.id), timeout=10)
    assert paused.state == RP.ROLLOUT_STATE_PAUSED
    resumed = client.rollouts.Resume(RP.RolloutActionRequest(id=rollout.id), timeout=10)
    assert resumed.state == RP.ROLLOUT_STATE_RUNNING
    watch_until_done(client, rollout.id)
    with pytest.raises(grpc.RpcError) as err:
        client.rollouts.Pause(RP.RolloutActionRequest(id=rollout.id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "SUCCEEDED" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.rollouts.Abort(RP.RolloutActionRequest(id="r-nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_operator_rollback_restores_previous_versions_and_abort_stops_a_rollout(
    cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    old, new = push(build(version=1)), push(build(version=2))
    ids = fleet_of(sim, 3, old)
    wait_for(lambda: len(cp.fleet.list_devices()) == 3, 10, what="devices registered")
    done = create(client, "digits:2", {"site": "lab"}, ["100%"])
    watch_until_done(client, done.id)
    assert set(sim.digests("digits").values()) == {new}
    rolled = client.rollouts.Rollback(RP.RolloutActionRequest(id=done.id, reason="latency"), timeout=10)
    assert rolled.state == RP.ROLLOUT_STATE_ROLLING_BACK
    watch_until_done(client, done.id)
    final = client.rollouts.Get(RP.GetRolloutRequest(id=done.id))
    assert final.state == RP.ROLLOUT_STATE_ROLLED_BACK and "latency" in final.reason
    assert set(sim.digests("digits").values()) == {old}

    for i in ids[1:]:
        sim.disconnect(i)  # offline: the second wave would wait for them
    slow = create(client, "digits:2", {"site": "lab"}, ["1", "100%"], timeout=60)
    wait_for(lambda: sim.digests("digits").get(ids[0]) == new, 10, what="the canary moved")
    aborted = client.rollouts.Abort(RP.RolloutActionRequest(id=slow.id), timeout=10)
    assert aborted.state == RP.ROLLOUT_STATE_ABORTED
    listed = client.rollouts.List(RP.ListRolloutsRequest(), timeout=10).rollouts
    assert {r.id: r.state for r in listed} == {
        done.id: RP.ROLLOUT_STATE_ROLLED_BACK,
        slow.id: RP.ROLLOUT_STATE_ABORTED,
    }


def _serve(
    tmp_path: Path, mosquitto: MosquittoProcess, port: int, key: SigningKey
) -> subprocess.Popen[bytes]:
    pub = tmp_path / "trusted.pem"
    if not pub.exists():
        from edgectl.artifact import public_pem

        pub.write_bytes(public_pem(key.public_key))
    log = (tmp_path / "cp.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "edgectl.control_plane", "serve", "--insecure", "--listen", f"127.0.0.1:{port}",
         "--mqtt", mosquitto.url, "--state", f"sqlite:///{tmp_path}/cp.db", "--blobs", str(tmp_path / "blobs"),
         "--trust", str(pub), "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_kill_nine_mid_rollout_then_restart_finishes_exactly_once(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    sim: SimFleet,
    build: Callable[..., Artifact],
    signing_key: SigningKey,
) -> None:
    port = free_port()
    proc = _serve(tmp_path, mosquitto, port, signing_key)
    try:
        assert wait_for_port("127.0.0.1", port, 30), (tmp_path / "cp.log").read_text()
        with ControlPlaneClient(f"127.0.0.1:{port}", timeout=20) as client:
            push_artifact(client, build(version=1).root)
            new = push_artifact(client, build(version=2).root).artifact.ref.digest
            ids = [f"dev-{i:03d}" for i in range(12)]
            for i in ids:
                # slow devices: the kill lands while a wave is in flight
                sim.add(i, {"site": "lab"}, delay=0.4)
            sim.connect(ids)
            wait_for(
                lambda: len(client.fleet.ListDevices(fleet_pb2.ListDevicesRequest()).devices) == 12,
                15,
                what="inventory",
            )
            rollout = create(client, "digits:2", {"site": "lab"}, ["1", "25%", "50%", "100%"], timeout=20)
            stream = client.rollouts.Watch(RP.WatchRolloutRequest(id=rollout.id), timeout=60)
            for event in stream:
                if event.kind == "wave_started" and event.wave == 1:
                    break
            stream.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _serve(tmp_path, mosquitto, port, signing_key)
        assert wait_for_port("127.0.0.1", port, 30)
        with ControlPlaneClient(f"127.0.0.1:{port}", timeout=20) as client:
            events = watch_until_done(client, rollout.id, timeout=60)
            final = client.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
        assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
        assert set(sim.digests("digits").values()) == {new}
        kinds = [(e.kind, e.wave, e.device_id, e.message) for e in events]
        assert len(kinds) == len(set(kinds)), "an event was logged twice"
        assert [k[0] for k in kinds].count("wave_started") == 4
        assert sorted(k[2] for k in kinds if k[0] == "device_healthy") == ids
        # each device got exactly one new desired state: no wave was started twice
        generations = sim.snapshot(lambda devs: {i: d.highest_generation for i, d in devs.items()})
        assert set(generations.values()) == {1}
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_offline_device_is_skipped_or_failed_per_policy(
    policy: str, cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    new = push(build(version=1))
    ids = fleet_of(sim, 3)
    wait_for(lambda: len(cp.fleet.list_devices()) == 3, 10, what="devices registered")
    sim.disconnect(ids[2])  # its Last Will marks it offline
    wait_for(lambda: not cp.fleet.get(ids[2]).online, 10, what="dev offline")
    offline = RP.OFFLINE_POLICY_SKIP if policy == "skip" else RP.OFFLINE_POLICY_FAIL
    request = RP.CreateRolloutRequest(
        artifact="digits",
        selector=common_pb2.Selector(match_labels={"site": "lab"}),
        strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=1, offline_policy=offline),
    )
    rollout = client.rollouts.Create(request)
    assert [d.device_id for d in rollout.waves[0].devices][-1] == ids[2], "offline devices go last"
    watch_until_done(client, rollout.id, timeout=30)
    final = client.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
    states = {d.device_id: d for w in final.waves for d in w.devices}
    if policy == "skip":
        assert final.state == RP.ROLLOUT_STATE_SUCCEEDED
        assert states[ids[2]].state == RP.DEVICE_ROLLOUT_STATE_SKIPPED and "offline" in states[ids[2]].reason
        assert [sim.digests("digits")[i] for i in ids[:2]] == [new, new]
    else:
        assert final.state == RP.ROLLOUT_STATE_FAILED and "offline" in final.reason
