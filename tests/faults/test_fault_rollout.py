"""Faults a rollout itself carries: a model that fails its smoke test, devices whose clocks are wrong."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgectl.artifact import TrustStore
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.sim import CLOCK_OFFSET_ENV
from tests.faults.conftest import LABELS, Artifacts, assert_fleet_verified, deploy, ids_of
from tests.harness.fleet import FleetRig

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
SKEW_S = -3 * 24 * 3600  # three days behind


def test_bad_model_stops_the_rollout_in_wave_two_and_everything_rolls_back(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: a model whose smoke test fails on the device is refused there while the old model
    keeps serving; with a failure budget of one the canary's refusal is tolerated, wave 2's are
    not: the rollout stops (FAILED), every device it moved gets its previous model back as desired
    state, and the whole fleet serves the old model, verified, with the refusal reported."""
    d1 = rig.push(artifacts.good(1))
    rig.push(artifacts.bad(2))
    sim = rig.simulate(4, labels=LABELS, per_process=4)
    rig.wait_all_online(ids_of(sim))
    assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d1)
    final = deploy(rig, 2, ("1", "100%"), max_failures="1")
    assert final.state == RP.ROLLOUT_STATE_FAILED, final.reason
    assert len(final.waves) == 2 and final.waves[1].state == RP.WAVE_STATE_FAILED
    assert {d.state for w in final.waves for d in w.devices} == {RP.DEVICE_ROLLOUT_STATE_ROLLED_BACK}
    assert_fleet_verified(rig, sim, trust, d1)
    assert "smoke test" in final.reason, final.reason  # the devices' own refusal reason, reported
    events = list(rig.client.rollouts.Watch(RP.WatchRolloutRequest(id=final.id), timeout=10))
    failed = {e.device_id for e in events if e.kind == "device_failed"}
    # The canary's refusal (within the budget of one) and at least one in wave 2 (over it); the
    # controller stops at once, so the rest of wave 2 is rolled back without being judged.
    assert len(failed) >= 2 and failed <= set(ids_of(sim))


@pytest.mark.parametrize("clock", ["libfaketime", "python"])
def test_device_clock_skew(clock: str, rig: FleetRig, artifacts: Artifacts, trust: TrustStore) -> None:
    """Promise: a device whose wall clock is days off (no NTP, a dead RTC battery) is rolled out to
    like any other: nothing in fetch, verify, swap or the health gate depends on its clock, and the
    control plane's inventory shows when it heard from the device by its own clock.

    ``libfaketime``: the worker runs under LD_PRELOAD=libfaketime (every clock the process reads,
    C libraries included); ``python``: edgectl.sim shifts the agent's Python wall-clock reads."""
    if clock == "libfaketime" and not LIBFAKETIME.exists():
        pytest.skip("libfaketime is not installed (apt-get install faketime); the python variant covers it")
    d1 = rig.push(artifacts.good(1))
    sim = rig.simulator(2, LABELS, per_process=1, prefix="clock")
    sim.start_worker(sim.workers[0])
    env = (
        {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{SKEW_S:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        if clock == "libfaketime"
        else {CLOCK_OFFSET_ENV: str(SKEW_S)}
    )
    sim.start_worker(sim.workers[1], env=env)
    skewed = sim.workers[1].devices[0].device_id
    rig.wait_all_online(ids_of(sim))
    reported_at = rig.reports.drain()[skewed].reported_at.ToSeconds()
    assert abs(reported_at - time.time() - SKEW_S) < 3600, "the device's clock is not skewed"
    assert deploy(rig, 1, ("1", "100%")).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d1)
    last_seen = rig.devices()[skewed].last_seen.ToSeconds()
    assert abs(last_seen - time.time()) < 3600, "last_seen must come from the control plane's clock"
