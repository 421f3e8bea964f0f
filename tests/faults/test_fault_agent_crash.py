"""kill -9 of devices at every step of the reconcile loop, in the middle of a real rollout."""

from __future__ import annotations

import signal

from edgectl.agent.reconcile import CRASHPOINT_ENV
from edgectl.artifact import TrustStore
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.faults.conftest import LABELS, MODEL, Artifacts, assert_fleet_verified, deploy, ids_of
from tests.harness.fleet import FleetRig, wait_for

POINTS = ("before-swap", "after-swap-before-commit", "after-commit")


def test_agents_killed_at_each_reconcile_step_converge_after_restart(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: a device that loses power (kill -9) while downloading, before the swap, between
    the swap and the commit of state.json, or just after the commit, restarts serving the old or
    the new model (never nothing), converges to the new one, and the rollout succeeds.

    Four worker processes of two devices each: three die at a crash point of the agent's own
    reconcile code (EDGECTL_AGENT_CRASHPOINT), the fourth is killed by the test mid-download."""
    d1 = rig.push(artifacts.good(1))
    new = artifacts.good(2)
    d2 = rig.push(new)
    sim = rig.simulate(8, labels=LABELS, per_process=2, bandwidth_bps=200_000)
    rig.wait_all_online(ids_of(sim))
    assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d1)
    crashing, downloading = sim.workers[:3], sim.workers[3]
    for worker, point in zip(crashing, POINTS, strict=True):
        sim.stop_worker(worker)
        sim.start_worker(worker, env={CRASHPOINT_ENV: point}, wait=False)
    for worker in crashing:
        sim.wait_ready(worker)
    r = rig.rollout(f"{MODEL}:2", LABELS, ["100%"], health_timeout_s=120)
    victim = sim.settings.data_dir(downloading.devices[0].device_id)
    new_chunks = {c.digest.removeprefix("sha256:") for f in new.manifest.files for c in f.chunks}

    def mid_download() -> bool:
        held = {p.name for p in (victim / "chunks").rglob("*") if p.is_file()}
        return bool(held & new_chunks) and not (held >= new_chunks)

    wait_for(mid_download, 60, what="the download to be under way", interval=0.02)
    sim.kill(downloading)
    for worker in crashing:
        assert sim.wait_exit(worker, 60) == -signal.SIGKILL, (
            f"worker {worker.index} did not reach its crash point"
        )
    for worker in sim.workers:
        sim.start_worker(worker, wait=False)
    final = rig.wait_done(r.id, 150)
    assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
    assert_fleet_verified(rig, sim, trust, d2)
