"""Storage faults: a device's disk fills up mid-download; the artifact's bytes vanish from the blob store."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgectl.artifact import LocalBlobStore, TrustStore
from edgectl.protos.v1 import artifacts_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.faults.conftest import (
    LABELS,
    MODEL,
    Artifacts,
    assert_fleet_verified,
    deploy,
    ids_of,
)
from tests.harness.fleet import FleetRig, wait_for

MB = 1_000_000


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[None]:
    """A real, small tmpfs mounted at ``path`` (needs root with CAP_SYS_ADMIN; skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'}); "
                    "the reserve variant of this test covers the agent's side")  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write a file until the filesystem is full (ENOSPC)."""
    filler = path / "filler.bin"
    block = b"\0" * 65536
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def last_error(rig: FleetRig, device_id: str) -> str:
    rs = rig.reports.drain().get(device_id)
    return rs.last_error if rs else ""


@pytest.mark.parametrize("how", ["tmpfs", "tmpfs-full-before", "reserve"])
def test_disk_full_during_download(
    how: str, rig: FleetRig, artifacts: Artifacts, trust: TrustStore, tmp_path: Path
) -> None:
    """Promise: a device whose disk fills up while it downloads keeps serving the old model, says
    why (last_error), never reports the new artifact as failed, and retries; once space returns it
    converges, and the rollout succeeds.

    ``tmpfs``: the device's data dir is a real 6 MB filesystem that the test fills mid-download
    (ENOSPC on the agent's writes); ``tmpfs-full-before``: it is full already when the new
    desired state arrives (the agent cannot even record it). ``reserve``: the agent's own free-space check before a
    download, with a reserve larger than the disk; the operator then restarts it with room."""
    d1 = rig.push(artifacts.good(1, size=MB))
    d2 = rig.push(artifacts.good(2, size=MB))
    sim = rig.simulator(1, LABELS, per_process=1, prefix="disk", bandwidth_bps=250_000, min_free_disk_mib=0)
    device = sim.devices[0].device_id
    data_dir = sim.settings.data_dir(device)
    with contextlib.ExitStack() as stack:
        if how.startswith("tmpfs"):
            stack.enter_context(small_filesystem(data_dir, "6m"))
        sim.start()
        stack.callback(sim.stop)
        rig.wait_all_online([device])
        assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
        assert_fleet_verified(rig, sim, trust, d1)
        if how == "reserve":
            sim.stop_worker(sim.workers[0])
            sim.settings = dataclasses.replace(sim.settings, min_free_disk_mib=1 << 30)
            sim.start_worker(sim.workers[0])
        filler = fill(data_dir) if how == "tmpfs-full-before" else None
        r = rig.rollout(f"{MODEL}:2", LABELS, ["100%"], health_timeout_s=120)
        if how == "tmpfs":
            new = {
                c.digest.removeprefix("sha256:")
                for f in artifacts.good(2, size=MB).manifest.files
                for c in f.chunks
            }
            wait_for(lambda: any(p.name in new for p in (data_dir / "chunks").rglob("*")), 60,
                     what="the download to start", interval=0.02)  # fmt: skip
            filler = fill(data_dir)
        wait_for(
            lambda: "space" in last_error(rig, device).lower(), 60, what="the device to say its disk is full"
        )
        assert rig.serving(MODEL).get(device) == d1, "the old model must keep serving"
        rs = rig.reports.drain()[device]
        assert all(m.failed_digest != d2 for m in rs.models), "a full disk is not the artifact's failure"
        if filler is not None:
            os.unlink(filler)
        else:
            sim.stop_worker(sim.workers[0])
            sim.settings = dataclasses.replace(sim.settings, min_free_disk_mib=0)
            sim.start_worker(sim.workers[0])
        final = rig.wait_done(r.id, 120)
        assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
        assert_fleet_verified(rig, sim, trust, d2)


def test_artifact_deleted_from_blob_store_during_rollout(
    rig: FleetRig, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: the API refuses to delete an artifact a rollout uses; if its bytes vanish from the
    blob store anyway (an operator's rm, a lost bucket), devices that cannot fetch it keep serving
    the old model, the wave fails at its health timeout, the rollout stops, and the device that
    had already moved rolls back: every device ends serving the old model, verified."""
    d1 = rig.push(artifacts.good(1))
    new = artifacts.good(2)
    d2 = rig.push(new)
    sim = rig.simulate(4, labels=LABELS, per_process=4, bandwidth_bps=150_000)
    rig.wait_all_online(ids_of(sim))
    assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, sim, trust, d1)
    # Paused after wave 1, so the bytes vanish after the first device fetched them and before any
    # other device asks: without the pause a loaded host let wave 2 fetch first (a race, not a promise).
    r = rig.rollout(f"{MODEL}:2", LABELS, ["1", "100%"], health_timeout_s=8, pause_after_waves=[1])
    with pytest.raises(grpc.RpcError) as refused:
        rig.client.artifacts.Delete(artifacts_pb2.DeleteArtifactRequest(digest=d2), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_for(lambda: rig.get(r.id).state == RP.ROLLOUT_STATE_PAUSED, 60, what="wave 1 to succeed")
    blobs = LocalBlobStore(rig.cp.blobs)
    old = {c.digest for f in artifacts.good(1).manifest.files for c in f.chunks}
    for chunk in {c.digest for f in new.manifest.files for c in f.chunks} - old:
        blobs.delete(chunk)
    rig.client.rollouts.Resume(RP.RolloutActionRequest(id=r.id), timeout=10)
    final = rig.wait_done(r.id, 90)
    assert final.state == RP.ROLLOUT_STATE_FAILED, final.reason
    moved = [d for d in final.waves[0].devices]
    assert [d.state for d in moved] == [RP.DEVICE_ROLLOUT_STATE_ROLLED_BACK]
    assert_fleet_verified(rig, sim, trust, d1)
    reports = rig.reports.drain()
    assert reports[moved[0].device_id].models[0].previous_digest == d2, "the first wave did move to v2"
