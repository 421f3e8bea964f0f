"""Maintenance windows on a real agent (real broker, real artifact server, real onnxruntime) with an
injected clock: fetch, verify and stage at once; swap only inside the window."""

from __future__ import annotations

import threading
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np

from edgectl.agent.agent import Agent
from edgectl.mqtt.orders import Order, OrderedModel
from edgectl.mqtt.wire import decode
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, V2Client
from tests.harness.clock import FakeClock

K = mpb.EventKind
BERLIN = ZoneInfo("Europe/Berlin")
WINDOW = "Mon-Fri 01:00-04:00 Europe/Berlin"


def test_staged_at_once_swapped_only_inside_the_window(rig: AgentRig) -> None:
    clock = FakeClock(datetime(2026, 12, 1, 12, 0, tzinfo=BERLIN).timestamp())  # Tuesday noon: closed
    v1 = rig.bundles.build(version=1, dims=(4, 8, 3), seeds=[1, 2])
    v2 = rig.bundles.build(version=2, dims=(4, 8, 3), seeds=[1, 3])
    d1, d2 = rig.server.add(v1.root), rig.server.add(v2.root)
    agent: Agent = rig.agent(clock=clock)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)

    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2, window=WINDOW))
    staged = rig.fleet.wait_model("mlp", lambda m: m.staged_digest == d2)
    assert staged.digest == d1 and staged.smoke_test_passed, "v1 keeps serving while v2 waits"
    assert (agent.config.data_dir / "artifacts" / d2.removeprefix("sha256:")).is_dir(), "downloaded now"
    kinds = rig.fleet.event_kinds(d2)
    assert K.EVENT_KIND_VERIFIED in kinds and K.EVENT_KIND_STAGED in kinds
    assert K.EVENT_KIND_SWAPPED not in kinds
    client = V2Client(agent.address)
    x = np.ones((1, 4), dtype=np.float32)
    assert client.infer("mlp", x)[2] == "1"
    served_bytes = rig.server.served_bytes

    # another pass (a reconnect, a heartbeat) while still closed: still no swap, nothing fetched again
    clock.set(datetime(2026, 12, 1, 23, 59, tzinfo=BERLIN).timestamp())
    agent.reconciler.request_report()  # type: ignore[union-attr]
    threading.Event().wait(0.5)
    assert rig.fleet.latest().models[0].digest == d1  # type: ignore[union-attr]

    # Wednesday 01:30 Berlin: inside the window, the staged copy swaps in without another download
    clock.set(datetime(2026, 12, 2, 1, 30, tzinfo=BERLIN).timestamp())
    agent.reconciler.request_report()  # type: ignore[union-attr]
    swapped = rig.fleet.wait_serving("mlp", d2)
    assert swapped.staged_digest == "" and swapped.previous_digest == d1
    assert rig.server.served_bytes == served_bytes
    assert client.infer("mlp", x)[2] == "2"

    # a rollback order carries no window: it swaps at once, even outside one
    clock.set(datetime(2026, 12, 2, 12, 0, tzinfo=BERLIN).timestamp())
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1, rollback=True))
    rig.fleet.wait_serving("mlp", d1)
    client.close()


def test_a_window_the_device_cannot_read_is_refused_not_ignored(rig: AgentRig) -> None:
    v1 = rig.bundles.build(version=1, dims=(4, 8, 3), seeds=[1, 2])
    d1 = rig.server.add(v1.root)
    rig.agent(serve=False)
    rig.fleet.desire(
        mpb.DesiredModel(name="mlp", digest=d1, version=1, window="Mon 01:00-02:00 Mars/Olympus")
    )
    refused = rig.fleet.wait_model("mlp", lambda m: m.failed_digest == d1)
    assert "Mars/Olympus" in refused.failure_reason and not refused.digest


def test_an_agent_that_predates_the_window_field_still_parses_the_order() -> None:
    """Older agents decode with unknown fields ignored and read only the order keys they know: the
    window is dropped, so they swap at once (the control plane's deadline still covers them)."""
    payload = (
        b'{"deviceId": "d", "generation": 3, "models": [{"name": "m", "digest": "", "futureField": "x"}]}'
    )
    state = decode(payload, mpb.DesiredState)
    assert state.generation == 3 and state.models[0].name == "m"
    order = Order(
        "d", 1, 3, 100.0, 200.0, "r-1", (OrderedModel("m", "sha256:" + "a" * 64, 2, False, WINDOW),)
    )
    raw = order.to_bytes()
    assert b'"window"' in raw
    assert Order.from_bytes(raw).models[0].window == WINDOW
    assert Order.from_bytes(raw).to_desired().models[0].window == WINDOW
    plain = Order("d", 1, 3, 100.0, 200.0, "r-1", (OrderedModel("m", "sha256:" + "a" * 64, 2),))
    assert b"window" not in plain.to_bytes(), "orders without a window keep their old bytes"
