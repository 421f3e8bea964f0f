"""The fetcher's loop of rounds against a real gRPC artifact server: when it waits, resumes, gives up."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from edgectl.agent.errors import FetchError
from edgectl.agent.fetch import ArtifactFetcher, FetchSettings, RoundResult
from edgectl.agent.presigned import PresignedTransport
from edgectl.agent.transports import GrpcTransport
from edgectl.artifact import LocalBlobStore
from edgectl.ports import free_port
from tests.agent.artifact_server import ArtifactStoreServer
from tests.agent.conftest import Bundles


class LongestDelay(random.Random):
    """Full jitter always drawing its ceiling: the backoff's waits become exact and visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


def fetcher(tmp_path: Path, server: ArtifactStoreServer, **settings: float) -> ArtifactFetcher:
    return ArtifactFetcher(
        LocalBlobStore(tmp_path / "chunks"),
        [GrpcTransport(server.address, timeout_s=5)],
        FetchSettings(chunks_per_request=4, **settings),  # type: ignore[arg-type]
        rng=LongestDelay(),
    )


def test_a_round_that_breaks_after_progress_resumes_at_once(
    tmp_path: Path, artifact_server: ArtifactStoreServer, bundles: Bundles
) -> None:
    art = bundles.build(version=1, dims=(64, 1024, 512, 8))
    digest = artifact_server.add(art.root)
    artifact_server.faults.drop_after = 2  # the first stream is cut after two chunks
    f = fetcher(tmp_path, artifact_server, retry_base_s=3.0, retry_max_s=3.0)
    start = time.monotonic()
    report = f.fetch(digest, art.manifest)
    assert time.monotonic() - start < 2.5, "a cut stream that was making progress waited a backoff"
    assert report.bytes_fetched == report.bytes_total and report.corrupt_chunks == 0
    assert max(artifact_server.served.values()) == 1, "a verified chunk was fetched twice"


def test_a_source_that_never_answers_is_retried_with_backoff_then_reported(
    tmp_path: Path, artifact_server: ArtifactStoreServer, bundles: Bundles
) -> None:
    art = bundles.build(version=1)
    digest = artifact_server.add(art.root)
    artifact_server.faults.unavailable = True
    f = fetcher(tmp_path, artifact_server, max_rounds=3, retry_base_s=0.4, retry_max_s=0.5)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"still missing after retries \(grpc: .*UNAVAILABLE") as info:
        f.fetch(digest, art.manifest)
    elapsed = time.monotonic() - start
    # Waits between rounds only, not after the last: 0.4 then 0.5 (the cap) with the longest jitter.
    assert 0.9 <= elapsed < 3.0, elapsed
    assert "chunks of" in str(info.value)


def test_a_chunk_corrupt_at_its_source_is_given_up_on_after_max_bad(
    tmp_path: Path, artifact_server: ArtifactStoreServer, bundles: Bundles
) -> None:
    art = bundles.build(version=1, dims=(64, 1024, 512, 8))
    digest = artifact_server.add(art.root)
    victim = art.manifest.file(art.manifest.model_file).chunks[1]
    blob = artifact_server.blobs.path(victim.digest)
    raw = bytearray(blob.read_bytes())
    raw[10] ^= 0xFF  # rotten on the server's disk: every copy it sends is wrong
    blob.write_bytes(bytes(raw))
    f = fetcher(tmp_path, artifact_server, max_rounds=4, max_bad_per_chunk=2, retry_base_s=0.05)
    with pytest.raises(
        FetchError, match=rf"1 chunks of .* \(grpc: chunk {victim.digest} arrived corrupt 4 times"
    ):
        f.fetch(digest, art.manifest)
    # Round 1 refuses it and stores the rest; from round 2 on each round stops at the bad copy
    # (max_bad_per_chunk) and the next one waits a backoff: one request per round, no more.
    assert artifact_server.served[victim.digest] == 4
    assert not f.store.has(victim.digest), "a corrupt chunk was stored"
    others = [c.digest for e in art.manifest.files for c in e.chunks if c.digest != victim.digest]
    assert all(f.store.has(d) for d in others), "the good chunks were not kept for the next attempt"


def test_round_results_say_when_to_resume_at_once() -> None:
    cut = RoundResult("grpc", chunks_stored=3, bytes_stored=900, corrupt=0, error="stream reset")
    assert cut.made_progress and cut.resume_at_once
    assert not RoundResult("grpc", 0, 0, 0, "UNAVAILABLE").resume_at_once  # no progress: back off
    assert not RoundResult("grpc", 3, 900, 2, "x arrived corrupt 2 times", gave_up_on="x").resume_at_once
    assert not RoundResult("mqtt", 3, 900, 0, None).resume_at_once  # ended cleanly, chunks missing


def test_a_fallback_gives_way_after_sticky_s_only_to_a_transport_that_prefers_itself_over_it(
    tmp_path: Path, artifact_server: ArtifactStoreServer, bundles: Bundles
) -> None:
    art = bundles.build(version=1)
    digest = artifact_server.add(art.root)
    dead = GrpcTransport(f"127.0.0.1:{free_port()}", timeout_s=1)  # a control plane out of reach
    urls = PresignedTransport(dead, allow_http=True, timeout_s=1)
    last_resort = GrpcTransport(artifact_server.address, timeout_s=5)  # stands in for MQTT chunks
    f = ArtifactFetcher(LocalBlobStore(tmp_path / "chunks"), [urls, dead, last_resort],
                        FetchSettings(retry_base_s=0.05, sticky_s=0.2))  # fmt: skip
    assert f.get_manifest(digest)[2] == "grpc" and f.fetch(digest, art.manifest).transport == "grpc"
    time.sleep(0.3)
    assert f._ordered()[0] is last_resort, "a broker-only site went back to a control plane it cannot reach"
    # The same fallback taken from the presigned transport's own control plane gives way.
    f._prefer(dead)
    time.sleep(0.3)
    assert f._ordered()[0] is urls
