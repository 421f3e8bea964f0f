"""A continuous rollout meets a real agent that enrolls after it was created (secured fleet: signed
orders, mTLS downloads): the agent converges with no new rollout, and a label change sends it back
to what it ran before, which here is nothing: the agent stops serving the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgectl.protos.v1 import common_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.tokens import Role
from tests.control_plane.sim_device import wait_for
from tests.security.test_signed_desired import NAME, Device, Rig, rig  # noqa: F401  (rig: fixture)


def test_a_device_enrolled_later_converges_and_leaves_with_its_label(
    rig: Rig,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "cfg"))
    fleet = rig.fleet
    with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
        # nothing matches yet: the rollout waits for its first device
        rollout = deployer.rollouts.Create(RP.CreateRolloutRequest(
            artifact=rig.digests[2], selector=common_pb2.Selector(match_labels={"dev": "late-agent"}),
            strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=60, continuous=True),
        ))  # fmt: skip
        device = Device(rig, "late-agent", tmp_path / "agent")  # enrolls with the label dev=late-agent
        try:
            wait_for(lambda: device.serves(2), 60, what="the late agent converged without a new rollout")

            def states() -> dict[str, int]:
                got = deployer.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
                return {d.device_id: d.state for w in got.waves for d in w.devices}

            wait_for(
                lambda: states().get(device.id) == RP.DEVICE_ROLLOUT_STATE_HEALTHY, 20, what="judged healthy"
            )
            fleet.cp.fleet.label(device.id, {"dev": "elsewhere"}, [])  # the operator's label wins
            wait_for(lambda: device.id not in states(), 20, what="the device left the rollout")
            # it ran nothing before this rollout: going back means the model is removed from its order
            wait_for(
                lambda: not device.retained_desired().models, 20, what="the model dropped from its order"
            )
            # and the agent stops serving it (it reports no such model any more)
            wait_for(lambda: NAME not in device.record().models, 20, what="the agent stopped serving it")
            assert device.agent is not None and device.agent.registry.get(NAME) is None
        finally:
            device.stop()
