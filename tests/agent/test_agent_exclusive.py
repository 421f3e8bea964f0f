"""An exclusive desired state names everything a device serves; a non-exclusive one (older control
planes) leaves unnamed models serving, as docs/protocol.md promised before the field existed."""

from __future__ import annotations

import threading

from edgectl.agent.agent import Agent
from edgectl.mqtt.wire import encode
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, Fleet, wait_for


def _publish(fleet: Fleet, exclusive: bool, *models: mpb.DesiredModel) -> None:
    fleet.generation += 1
    state = mpb.DesiredState(
        device_id=fleet.device_id, generation=fleet.generation, models=list(models), exclusive=exclusive
    )
    fleet.client.publish(fleet.topics.desired, encode(state), retain=True)


def test_only_an_exclusive_order_stops_a_model_it_no_longer_names(rig: AgentRig) -> None:
    a = rig.server.add(rig.bundles.build(name="alpha", version=1, dims=(4, 8, 3), seeds=[1, 2]).root)
    b = rig.server.add(rig.bundles.build(name="beta", version=1, dims=(4, 8, 3), seeds=[3, 4]).root)
    agent: Agent = rig.agent(serve=False)
    _publish(rig.fleet, True, mpb.DesiredModel(name="alpha", digest=a, version=1),
             mpb.DesiredModel(name="beta", digest=b, version=1))  # fmt: skip
    rig.fleet.wait_serving("alpha", a)
    rig.fleet.wait_serving("beta", b)

    # an older control plane's state without beta: beta keeps serving (the documented rule)
    _publish(rig.fleet, False, mpb.DesiredModel(name="alpha", digest=a, version=1))
    wait_for(lambda: (rig.fleet.latest() or mpb.ReportedState()).observed_generation == rig.fleet.generation, 20,
             "the non-exclusive state observed")  # fmt: skip
    threading.Event().wait(0.3)
    assert agent.registry.get("beta") is not None
    assert {m.name for m in rig.fleet.latest().models} == {"alpha", "beta"}  # type: ignore[union-attr]

    # an exclusive state without beta: beta stops, alpha is untouched
    _publish(rig.fleet, True, mpb.DesiredModel(name="alpha", digest=a, version=1))
    wait_for(lambda: {m.name for m in (rig.fleet.latest() or mpb.ReportedState()).models} == {"alpha"}, 20,
             "beta dropped")  # fmt: skip
    assert agent.registry.get("beta") is None and agent.registry.get("alpha") is not None
    assert "beta" not in agent.reconciler.state.models  # type: ignore[union-attr]
