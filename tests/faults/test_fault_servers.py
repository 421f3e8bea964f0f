"""Faults of the servers a fleet depends on: the broker and the control plane die mid-rollout."""

from __future__ import annotations

import time

from edgectl.artifact import TrustStore
from edgectl.broker import MosquittoProcess
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.faults.conftest import (
    LABELS,
    MODEL,
    Artifacts,
    assert_fleet_verified,
    deploy,
    ids_of,
    wave_started,
)
from tests.harness.fleet import FleetRig, wait_for


def test_broker_killed_and_restarted_mid_rollout(
    rig: FleetRig, mosquitto: MosquittoProcess, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: a broker crash (kill -9: retained messages since its last autosave are lost) in
    the middle of a wave loses nothing. The control plane republishes every desired state when it
    reconnects, agents reconnect with jitter and converge, the rollout finishes SUCCEEDED, and
    every device serves the new model, verified."""
    rig.push(artifacts.good(1))
    d2 = rig.push(artifacts.good(2))
    sim = rig.simulate(6, labels=LABELS, per_process=3, bandwidth_bps=150_000)
    rig.wait_all_online(ids_of(sim))
    r = rig.rollout(f"{MODEL}:2", LABELS, ["1", "50%", "100%"], health_timeout_s=90)
    wait_for(lambda: wave_started(rig, r.id, 1), 60, what="wave 2 to start")
    mosquitto.kill()
    time.sleep(1.0)
    mosquitto.start()
    rig.reconnect_reports()
    final = rig.wait_done(r.id, 150)
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    assert_fleet_verified(rig, sim, trust, d2)


def test_control_plane_killed_and_restarted_mid_rollout(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: kill -9 of the control plane while a wave is in flight, then a restart on the same
    state, finishes the rollout exactly once: agents keep working from the retained desired state
    and their own chunk stores, no wave starts twice, every device serves the new model, verified."""
    rig.push(artifacts.good(1))
    d2 = rig.push(artifacts.good(2))
    sim = rig.simulate(6, labels=LABELS, per_process=3, bandwidth_bps=150_000)
    rig.wait_all_online(ids_of(sim))
    r = rig.rollout(f"{MODEL}:2", LABELS, ["1", "50%", "100%"], health_timeout_s=90)
    wait_for(lambda: wave_started(rig, r.id, 1), 60, what="wave 2 to start")
    rig.cp.kill9()
    time.sleep(1.0)
    rig.cp.start()
    final = rig.wait_done(r.id, 150)
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    assert_fleet_verified(rig, sim, trust, d2)
    healthy = sorted(
        d.device_id for w in final.waves for d in w.devices if d.state == RP.DEVICE_ROLLOUT_STATE_HEALTHY
    )
    assert healthy == sorted(ids_of(sim))
    assert len(final.waves) == 3 and all(w.state == RP.WAVE_STATE_SUCCEEDED for w in final.waves)


def test_fleet_converges_through_two_rollouts_keeping_the_previous_version(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise (the baseline every fault is measured against): a fleet of real agents converges
    through two rollouts in a row, each device keeping the previous version for rollback."""
    d1 = rig.push(artifacts.good(1))
    d2 = rig.push(artifacts.good(2))
    sim = rig.simulate(4, labels=LABELS, per_process=2)
    rig.wait_all_online(ids_of(sim))
    assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d1)
    assert deploy(rig, 2, ("1", "100%")).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d2)
    reports = rig.reports.drain()
    assert {m.previous_digest for i in ids_of(sim) for m in reports[i].models} == {d1}
