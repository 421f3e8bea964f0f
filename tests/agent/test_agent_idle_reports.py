"""Reports that change nothing are not re-sent on every heartbeat: over a real broker, an idle
agent stays quiet until ``idle_report_s`` has passed, and anything that changes goes at once."""

from __future__ import annotations

import time

from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, wait_for


def _reports_after(rig: AgentRig, seconds: float) -> list[mpb.ReportedState]:
    rig.fleet.drain()
    before = len(rig.fleet.reported)
    time.sleep(seconds)
    rig.fleet.drain()
    return rig.fleet.reported[before:]


def test_an_idle_agent_sends_no_repeated_report_but_a_change_at_once(rig: AgentRig) -> None:
    rig.agent(serve=False, heartbeat_s=0.2, idle_report_s=300.0)
    wait_for(rig.fleet.latest, 20, "the agent's first report")
    time.sleep(0.5)  # the first pass's reports (connect, restore) are out
    assert _reports_after(rig, 2.0) == []  # ten heartbeats, nothing new to say
    heartbeats = [e for e in rig.fleet.events if e.kind == mpb.EVENT_KIND_HEARTBEAT]
    assert len(heartbeats) <= 2  # only with the reports that went out
    v1 = rig.bundles.build(version=1, dims=(4, 8, 3), seeds=[1, 2])
    d1 = rig.server.add(v1.root)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1, timeout=30)  # the change is reported without waiting
    time.sleep(0.5)
    assert _reports_after(rig, 2.0) == []


def test_an_unchanged_report_is_resent_every_idle_report_interval(rig: AgentRig) -> None:
    rig.agent(serve=False, heartbeat_s=0.2, idle_report_s=0.5)
    wait_for(rig.fleet.latest, 20, "the agent's first report")
    again = _reports_after(rig, 2.6)
    assert 3 <= len(again) <= 7, [r.reported_at.ToJsonString() for r in again]
    stamps = [r.reported_at.ToNanoseconds() for r in again]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # fresh timestamps: last seen moves
