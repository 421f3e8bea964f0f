"""A maintenance window end to end on a secured fleet: the window is part of the signed order, a
real agent stages at once and swaps only inside it, and the control plane shows the wait.

The agent's wall clock for windows is injected; order expiry keeps real time (the rig's orders
live ``TTL`` seconds and are re-signed meanwhile, so the window must survive re-signing too).
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from edgectl.mqtt.orders import Order
from edgectl.protos.v1 import common_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.tokens import Role
from tests.control_plane.sim_device import wait_for
from tests.harness.clock import FakeClock
from tests.security.test_signed_desired import NAME, TTL, Device, Rig, rig  # noqa: F401  (rig: fixture)

BERLIN = ZoneInfo("Europe/Berlin")
WINDOW = "Mon-Fri 01:00-04:00 Europe/Berlin"


def test_signed_window_is_staged_then_swapped_inside_it(
    rig: Rig,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "cfg"))
    clock = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=BERLIN).timestamp())  # Tuesday noon: closed
    device = Device(rig, "window-dev", tmp_path / "agent", clock=clock)
    try:
        device.deploy(1)
        fleet = rig.fleet
        with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
            rollout = deployer.rollouts.Create(RP.CreateRolloutRequest(
                artifact=rig.digests[2], selector=common_pb2.Selector(match_labels={"dev": device.id}),
                strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=60, window=WINDOW),
            ))  # fmt: skip

            def progress() -> RP.DeviceProgress:
                got = deployer.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
                return got.waves[0].devices[0]

            # the order names the window inside the signed bytes, not only in the readable copy
            # The first wave is published by the controller's next step (a tick, not inside Create).
            wait_for(lambda: Order.from_bytes(device.retained_desired().signed.payload).models[0].digest
                     == rig.digests[2], 10, what="the wave's order published")  # fmt: skip
            signed = Order.from_bytes(device.retained_desired().signed.payload)
            assert [(m.digest, m.window) for m in signed.models] == [(rig.digests[2], WINDOW)]
            wait_for(lambda: device.record().models[NAME].staged_digest == rig.digests[2], 30,
                     what="v2 staged on the device")  # fmt: skip
            assert device.serves(1)
            wait_for(lambda: "waiting for the window" in progress().reason, 10, what="the wait shown")
            assert progress().state == RP.DEVICE_ROLLOUT_STATE_DESIRED

            # The readable copy stripped of its window, the signature kept: the agent acts on the
            # signed order alone, so it still waits.
            stripped = device.retained_desired()
            stripped.models[0].window = ""
            device.publish(stripped)
            # and the order is re-signed (TTL) meanwhile: the window must survive that as well
            threading.Event().wait(TTL)
            assert Order.from_bytes(device.retained_desired().signed.payload).counter > signed.counter
            assert device.serves(1) and device.record().models[NAME].staged_digest == rig.digests[2]

            # Wednesday 01:30 in Berlin: the staged copy swaps in, and the rollout succeeds
            clock.set(datetime(2026, 12, 2, 1, 30, tzinfo=BERLIN).timestamp())
            assert device.agent is not None and device.agent.reconciler is not None
            device.agent.reconciler.request_report()
            wait_for(lambda: device.serves(2), 30, what="v2 swapped inside the window")
            wait_for(lambda: deployer.rollouts.Get(RP.GetRolloutRequest(id=rollout.id)).state
                     == RP.ROLLOUT_STATE_SUCCEEDED, 30, what="the rollout to succeed")  # fmt: skip
    finally:
        device.stop()
