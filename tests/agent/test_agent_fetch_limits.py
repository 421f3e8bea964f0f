"""Download limits over a real gRPC artifact server: the bandwidth cap and the free-space check."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from edgectl.agent.agent import Agent
from edgectl.agent.fetch import ArtifactFetcher, FetchSettings, TokenBucket
from edgectl.agent.transports import GrpcTransport
from edgectl.artifact import LocalBlobStore, Manifest
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.artifact_server import ArtifactStoreServer
from tests.agent.conftest import AgentRig, Bundles, V2Client, wait_for

K = mpb.EventKind


def test_token_bucket_never_passes_bytes_faster_than_its_rate() -> None:
    bucket = TokenBucket(rate=200_000, burst=10_000)
    start = time.monotonic()
    for _ in range(10):
        bucket.consume(10_000)  # 100 kB: at most the 10 kB burst passes without waiting
    assert time.monotonic() - start >= (100_000 - 10_000) / 200_000
    assert TokenBucket(None).consume(10**9) == 0.0  # no limit: never waits


def test_limited_fetch_takes_at_least_its_bytes_over_the_limit(
    tmp_path: Path, artifact_server: ArtifactStoreServer, bundles: Bundles
) -> None:
    art = bundles.build(version=1, dims=(64, 1024, 512, 8))  # ~2.4 MB of weights
    digest = artifact_server.add(art.root)
    rate, burst = 4_000_000.0, 64_000.0
    transport = GrpcTransport(artifact_server.address)
    fetcher = ArtifactFetcher(
        LocalBlobStore(tmp_path / "chunks"),
        [transport],
        FetchSettings(bandwidth_bps=rate, bandwidth_burst=burst),
    )
    manifest = Manifest.from_bytes(fetcher.get_manifest(digest)[0])
    start = time.monotonic()
    report = fetcher.fetch(digest, manifest)
    elapsed = time.monotonic() - start
    transport.close()
    assert report.bytes_fetched == report.bytes_total > 2_000_000
    floor = (report.bytes_fetched - burst) / rate
    assert elapsed >= floor, f"{report.bytes_fetched} bytes in {elapsed:.3f} s under a {rate:.0f} B/s limit"


def test_download_is_not_started_without_the_free_space_it_needs(rig: AgentRig) -> None:
    v1, v2 = rig.bundles.build(version=1), rig.bundles.build(version=2, seeds=[3, 4])
    d1, d2 = rig.server.add(v1.root), rig.server.add(v2.root)
    agent: Agent = rig.agent()
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    rig.fleet.wait_serving("mlp", d1)
    served_before = rig.server.served_bytes

    # Ask for more headroom than the disk has: the agent must not start the download.
    free_mib = shutil.disk_usage(agent.config.data_dir).free >> 20
    assert agent.reconciler is not None
    fetcher = agent.reconciler.fetcher
    fetcher.settings = FetchSettings(reserve_bytes=(free_mib + 1024) << 20)
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2))
    wait_for(
        lambda: K.EVENT_KIND_FAILED in rig.fleet.event_kinds(d2), what="a FAILED event for the space check"
    )
    failed = [e for e in rig.fleet.events if e.digest == d2 and e.kind == K.EVENT_KIND_FAILED]
    assert "MiB free" in failed[0].message and "reserve" in failed[0].message, failed[0].message
    rs = wait_for(lambda: (r := rig.fleet.latest()) is not None and "MiB free" in r.last_error and r)
    assert rs.models[0].digest == d1 and rs.models[0].smoke_test_passed
    assert rig.server.served_bytes == served_before  # not one chunk was downloaded
    client = V2Client(agent.address)
    assert client.infer("mlp", np.zeros((1, 4), np.float32))[2] == "1"  # still serving the old version

    # Space returns (the operator freed some): the next retry converges.
    fetcher.settings = FetchSettings()
    rig.fleet.wait_serving("mlp", d2, timeout=30)
    client.close()
