"""The server faults again, at fleet scale: 100 real agents (slow; `make bench` runs it)."""

from __future__ import annotations

import time

import pytest

from edgectl.artifact import TrustStore
from edgectl.broker import MosquittoProcess
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.faults.conftest import LABELS, MODEL, Artifacts, assert_fleet_verified, ids_of, wave_started
from tests.harness.fleet import FleetRig, wait_for


@pytest.mark.slow
def test_hundred_agents_survive_broker_and_control_plane_crashes_in_one_rollout(
    rig: FleetRig, mosquitto: MosquittoProcess, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: with 100 devices mid-rollout, a broker kill -9 in wave 2 and a control-plane
    kill -9 in wave 3 lose nothing: the rollout finishes SUCCEEDED once, every wave once, and all
    100 devices serve the new model, verified."""
    d2 = rig.push(artifacts.good(2))
    sim = rig.simulate(100, labels=LABELS, per_process=50, heartbeat_s=10.0, bandwidth_bps=400_000)
    rig.wait_all_online(ids_of(sim), timeout=300)
    r = rig.rollout(f"{MODEL}:2", LABELS, ["1", "10%", "50%", "100%"], health_timeout_s=300)
    wait_for(lambda: wave_started(rig, r.id, 1), 120, what="wave 2 to start")
    mosquitto.kill()
    time.sleep(1.0)
    mosquitto.start()
    rig.reconnect_reports()
    wait_for(lambda: wave_started(rig, r.id, 2), 300, what="wave 3 to start")
    rig.cp.kill9()
    rig.cp.start()
    final = rig.wait_done(r.id, 600)
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    assert [w.state for w in final.waves] == [RP.WAVE_STATE_SUCCEEDED] * 4
    assert_fleet_verified(rig, sim, trust, d2, timeout=300)
