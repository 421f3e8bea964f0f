"""A real agent over a real broker follows trial orders: canary beside the current version, then
promotion (the trial fields dropped) or rollback; shadow with a disagreeing candidate reports
low agreement. The trial fields travel inside the signed order."""

from __future__ import annotations

import numpy as np
import pytest

from edgectl.agent.agent import Agent
from edgectl.artifact.canonical import canonical_bytes, parse_canonical
from edgectl.mqtt.orders import Order, OrderedModel, OrderError
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, Fleet, V2Client, wait_for

RNG = np.random.default_rng(11)
DIMS = (4, 8, 5)


def _traffic(client: V2Client, n: int) -> list[str]:
    return [client.infer("mlp", RNG.standard_normal((1, 4)).astype(np.float32))[2] for _ in range(n)]


def _trial(fleet: Fleet, check) -> mpb.TrialStats:  # type: ignore[no-untyped-def]
    return fleet.wait_model("mlp", lambda m: m.HasField("trial") and check(m.trial)).trial


def test_canary_then_promote_and_shadow_then_rollback(rig: AgentRig) -> None:
    v1 = rig.bundles.build(version=1, dims=DIMS, seeds=[1, 2])
    v2 = rig.bundles.build(version=2, dims=DIMS, seeds=[1, 2])  # agrees with v1
    v3 = rig.bundles.build(version=3, dims=DIMS, seeds=[1, 2], negate=True)  # top-1 almost never agrees
    d1, d2, d3 = (rig.server.add(b.root) for b in (v1, v2, v3))
    agent: Agent = rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    client = V2Client(agent.address)
    try:
        # Canary 10 %: v2 beside v1, exactly one unversioned request in ten answered by v2.
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2, canary_percent=10.0))
        rig.fleet.wait_serving("mlp", d2)
        wait_for(lambda: agent.trials.plan("mlp") is not None, what="the trial to start")
        versions = _traffic(client, 200)
        assert 0.08 <= versions.count("2") / 200 <= 0.12 and set(versions) == {"1", "2"}
        trial = _trial(rig.fleet, lambda t: t.compared > 0 and sum(v.requests for v in t.versions) >= 200)
        assert (trial.mode, trial.current_version, trial.candidate_version) == ("canary", 1, 2)
        assert trial.agreement_kind == "top1" and trial.agreement == 1.0
        p99 = {v.version: v.p99_ms for v in trial.versions}
        assert p99[1] > 0 and p99[2] > 0

        # Promote: the same digest without the trial fields; v1 drains, v2 answers everything.
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2))
        rig.fleet.wait_model("mlp", lambda m: m.digest == d2 and not m.HasField("trial"))
        wait_for(lambda: [m.version for m in agent.registry.versions("mlp")] == ["2"], what="v1 to drain")
        assert set(_traffic(client, 20)) == {"2"}

        # Shadow a disagreeing candidate: v2 answers everything, v3 runs behind it and disagrees.
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d3, version=3, shadow=True))
        rig.fleet.wait_serving("mlp", d3)
        wait_for(lambda: agent.trials.plan("mlp") is not None, what="the shadow trial to start")
        assert set(_traffic(client, 100)) == {"2"}
        # Shadow runs happen behind the answers: wait until all 100 are accounted for (run or skipped).
        trial = _trial(
            rig.fleet, lambda t: t.compared >= 20 and t.background_runs + t.background_skipped >= 100
        )
        assert trial.mode == "shadow" and trial.agreement < 0.5
        assert trial.background_runs + trial.background_skipped == 100

        # Roll back to v2 (what the controller sends): v3 is dropped, the trial ends.
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2, rollback=True))
        rig.fleet.wait_model("mlp", lambda m: m.digest == d2 and not m.HasField("trial"))
        wait_for(lambda: [m.version for m in agent.registry.versions("mlp")] == ["2"], what="v3 to go")
        assert set(_traffic(client, 20)) == {"2"}
    finally:
        client.close()


def test_trial_fields_are_signed_and_absent_from_orders_without_a_trial() -> None:
    digest = "sha256:" + "a" * 64
    plain = Order("d", 1, 2, 10.0, 20.0, "r", (OrderedModel("m", digest, 2),))
    assert b"canary_percent" not in plain.to_bytes() and b"shadow" not in plain.to_bytes()
    trial = Order(
        "d", 1, 2, 10.0, 20.0, "r", (OrderedModel("m", digest, 2, canary_percent=12.5, shadow=True),)
    )
    again = Order.from_bytes(trial.to_bytes())
    assert again == trial
    desired = again.to_desired().models[0]
    assert (desired.canary_percent, desired.shadow) == (12.5, True)


def test_an_order_with_an_impossible_canary_percentage_is_malformed() -> None:
    digest = "sha256:" + "a" * 64
    doc = parse_canonical(Order("d", 1, 2, 10.0, 20.0, "r", (OrderedModel("m", digest, 2),)).to_bytes())
    doc["models"][0]["canary_percent"] = 150
    with pytest.raises(OrderError, match="canary_percent"):
        Order.from_bytes(canonical_bytes(doc))


def test_a_restart_mid_trial_brings_the_current_version_back_and_the_trial_goes_on(rig: AgentRig) -> None:
    v1 = rig.bundles.build(version=1, dims=DIMS, seeds=[1, 2])
    v2 = rig.bundles.build(version=2, dims=DIMS, seeds=[1, 2])
    d1, d2 = rig.server.add(v1.root), rig.server.add(v2.root)
    agent: Agent = rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2, canary_percent=50.0))
    wait_for(lambda: agent.trials.plan("mlp") is not None, what="the trial to start")
    agent.stop()

    again: Agent = rig.agent()  # same data dir
    wait_for(lambda: again.trials.plan("mlp") is not None, what="the trial to resume after the restart")
    assert sorted(m.version for m in again.registry.versions("mlp")) == ["1", "2"]
    assert again.registry.get("mlp").version == "2"  # type: ignore[union-attr]  # still the candidate
    client = V2Client(again.address)
    try:
        versions = _traffic(client, 40)
    finally:
        client.close()
    assert versions.count("2") == 20 and versions.count("1") == 20
