"""Several replicas over one PostgreSQL schema: one leads, a survivor takes over, the rollout finishes once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edgectl.artifact import Artifact
from edgectl.client import ControlPlaneClient, push_artifact
from edgectl.control_plane.leader import FileLeaderLock
from edgectl.control_plane.server import ControlPlane
from edgectl.protos.v1 import common_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.control_plane.sim_device import SimFleet, wait_for


def test_one_leader_and_failover_on_postgres(
    cp_factory: Callable[..., ControlPlane], postgres_url: str, sim: SimFleet, build: Callable[..., Artifact]
) -> None:
    first = cp_factory(state_url=postgres_url)
    assert first.election.leading.wait(10)
    second = cp_factory(state_url=postgres_url)
    time.sleep(0.6)  # a few election rounds: the second must stay a follower while the first lives
    assert not second.leading
    with ControlPlaneClient(second.address) as client:  # any replica serves the API
        push_artifact(client, build(version=1).root)
        ids = [f"dev-{i}" for i in range(6)]
        for i in ids:
            sim.add(i, {"site": "lab"}, delay=0.3)
        sim.connect()
        wait_for(lambda: len(second.fleet.list_devices()) == 6, 10, what="devices in the shared inventory")
        request = RP.CreateRolloutRequest(
            artifact="digits",
            selector=common_pb2.Selector(match_labels={"site": "lab"}),
            strategy=RP.Strategy(waves=["1", "50%", "100%"], health_timeout_seconds=10),
        )
        rollout = client.rollouts.Create(request)
        wait_for(
            lambda: client.rollouts.Get(RP.GetRolloutRequest(id=rollout.id)).current_wave >= 1,
            10,
            what="wave 2",
        )
        first.stop(grace=0)
        assert second.election.leading.wait(10), "the survivor did not take over"
        events = list(client.rollouts.Watch(RP.WatchRolloutRequest(id=rollout.id), timeout=30))
        final = client.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    kinds = [(e.kind, e.wave, e.device_id, e.message) for e in events]
    assert len(kinds) == len(set(kinds)) and [k[0] for k in kinds].count("wave_started") == 3
    assert set(sim.snapshot(lambda d: {x.highest_generation for x in d.values()})) == {1}


def test_sqlite_leader_lock_admits_one_holder(tmp_path: Path) -> None:
    a, b = FileLeaderLock(tmp_path / "state.db.leader"), FileLeaderLock(tmp_path / "state.db.leader")
    assert a.try_acquire() and not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()
