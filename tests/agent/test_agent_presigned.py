"""Chunks straight from the blob store: a real control plane on moto's S3 server signs URLs, and the
agent's own transports GET them over HTTP, resume cut bodies with Range, and refuse tampered objects.

Everything is real: moto's S3 server over HTTP, a control plane with an ``s3://`` blob store and a
real broker, the agent (or its fetcher and transports), and a TCP proxy that counts and cuts the
bytes between the device and the bucket.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgectl.agent.agent import Agent
from edgectl.agent.errors import FetchError, UrlsNotOfferedError
from edgectl.agent.fetch import ArtifactFetcher, FetchSettings
from edgectl.agent.presigned import PresignedTransport
from edgectl.agent.transports import GrpcTransport
from edgectl.artifact import (
    LocalBlobStore,
    SigningKey,
    TrustStore,
    all_chunk_digests,
    chunk_sizes,
    public_pem,
)  # fmt: skip
from edgectl.artifact.s3store import IMMUTABLE
from edgectl.broker import MosquittoProcess
from edgectl.protos.v1 import artifacts_pb2 as apb
from edgectl.protos.v1 import common_pb2, fleet_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.agent.conftest import agent_config, wait_for
from tests.agent.presigned_rig import Bucket, bucket, fetch, make_fetcher, plane_on, proxy, push
from tests.contracts.conftest import RealControlPlane
from tests.faults.proxy import TcpProxy

__all__ = ["bucket", "proxy"]  # fixtures, used by name


def test_chunks_come_from_the_bucket_and_a_delta_moves_only_what_changed(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey,
    bucket: Bucket, proxy: TcpProxy,
) -> None:  # fmt: skip
    with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
        v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
        v2 = push(plane, tmp_path, signing_key, 2, (1, 2, 4))  # only the last layer differs
        f = make_fetcher(tmp_path, plane, fallback=False)  # URLs only: no byte can come through gRPC
        first = fetch(f, v1)
        assert (first.transport, first.bytes_fetched, first.corrupt_chunks) == ("presigned", v1.size, 0)
        wire_first = proxy.injected.downstream_bytes
        # Bytes on the wire per device vs the artifact: the bodies plus one response header each.
        assert v1.size <= wire_first <= 1.01 * v1.size, (wire_first, v1.size)
        second = fetch(f, v2)
        changed = all_chunk_digests(v2.manifest) - all_chunk_digests(v1.manifest)
        changed_bytes = sum(chunk_sizes(v2.manifest)[d] for d in changed)
        assert 0 < changed_bytes < v2.size / 2, "the delta fixture must change a small part"
        assert (second.chunks_fetched, second.bytes_fetched) == (len(changed), changed_bytes)
        assert second.bytes_reused == v2.size - changed_bytes
        wire_delta = proxy.injected.downstream_bytes - wire_first
        assert changed_bytes <= wire_delta <= 1.1 * changed_bytes, (wire_delta, changed_bytes)
        # A URL is signed only for a chunk of the artifact named: a v2-only chunk is not part of v1.
        with pytest.raises(grpc.RpcError) as info:
            plane.client.artifacts.GetChunkUrls(
                apb.GetChunkUrlsRequest(digest=v1.digest, chunks=sorted(changed)), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cut_body_resumes_with_a_range_request(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey,
    bucket: Bucket, proxy: TcpProxy,
) -> None:  # fmt: skip
    with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
        v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
        f = make_fetcher(tmp_path, plane, fallback=False)
        sizes = [chunk_sizes(v1.manifest)[d] for d in f.missing(v1.manifest)]  # in the order of the GETs
        big = next(i for i, n in enumerate(sizes) if n >= 128 << 10)
        first = sizes[big]
        proxy.truncate_after = sum(sizes[:big]) + first // 2  # mid-body of the first big chunk
        report = fetch(f, v1)
        assert proxy.injected.truncated == 1
        assert (report.transport, report.bytes_fetched, report.corrupt_chunks) == ("presigned", v1.size, 0)
        # Resumed where it broke: had the chunk started over, its first half would cross the wire twice.
        overhead = proxy.injected.downstream_bytes - v1.size
        assert 0 < overhead < first // 8, overhead


def test_a_tampered_object_in_the_bucket_is_refused_and_nothing_is_installed(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey, bucket: Bucket,
) -> None:  # fmt: skip
    trust_file = tmp_path / "trusted.pub.pem"
    trust_file.write_bytes(public_pem(signing_key.public_key))
    with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
        v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
        v2 = push(plane, tmp_path, signing_key, 2, (1, 2, 4))
        config = agent_config(
            tmp_path / "device", trust_file, device_id="s3-dev", mqtt=mosquitto.url,
            control_plane=plane.address, labels={"ring": "s3"}, blob_urls="any",
        )  # fmt: skip
        agent = Agent(config)
        agent.start()
        try:
            _rollout(plane, v1.digest)
            fetched = agent.metrics.registry.get_sample_value
            assert fetched("edgectl_agent_fetched_bytes_total", {"transport": "presigned"}) == v1.size
            assert not fetched("edgectl_agent_fetched_bytes_total", {"transport": "grpc"})
            # Overwrite one chunk that only v2 has with other bytes of the same size.
            victim = sorted(all_chunk_digests(v2.manifest) - all_chunk_digests(v1.manifest))[0]
            good = bucket.s3.get_object(Bucket=bucket.name, Key=bucket.key(victim))["Body"].read()
            bucket.s3.put_object(
                Bucket=bucket.name, Key=bucket.key(victim), Body=bytes(b ^ 0xFF for b in good)
            )
            rollout = _create(plane, v2.digest)
            wait_for(lambda: "still missing" in (agent.reconciler.last_error if agent.reconciler else ""), 90,
                     what="the agent to give up on the tampered chunk")  # fmt: skip
            chunks = LocalBlobStore(config.data_dir / "chunks")
            assert not chunks.has(victim), "a tampered chunk was stored"
            assert not (config.data_dir / "artifacts" / v2.digest.removeprefix("sha256:")).exists()
            assert (
                agent.reconciler is not None and agent.reconciler.state.slot("mlp").active.digest == v1.digest
            )
            # Positive control: the right bytes back in the bucket, and the same rollout converges.
            bucket.s3.put_object(Bucket=bucket.name, Key=bucket.key(victim), Body=good)
            assert _wait_done(plane, rollout).state == RP.ROLLOUT_STATE_SUCCEEDED
        finally:
            agent.stop()


def _create(plane: RealControlPlane, digest: str) -> str:
    request = RP.CreateRolloutRequest(
        artifact=digest,
        selector=common_pb2.Selector(match_labels={"ring": "s3"}),
        strategy=RP.Strategy(waves=["100%"], max_failures="0", health_timeout_seconds=120),
    )
    return str(plane.client.rollouts.Create(request, timeout=10).id)


def _wait_done(plane: RealControlPlane, rollout_id: str) -> Any:
    for _ in plane.client.rollouts.Watch(RP.WatchRolloutRequest(id=rollout_id), timeout=150):
        pass  # the stream ends when the rollout does
    return plane.client.rollouts.Get(RP.GetRolloutRequest(id=rollout_id), timeout=10)


def _rollout(plane: RealControlPlane, digest: str) -> None:
    wait_for(lambda: _online(plane), 30, what="the device online")
    assert _wait_done(plane, _create(plane, digest)).state == RP.ROLLOUT_STATE_SUCCEEDED


def _online(plane: RealControlPlane) -> bool:
    try:
        return bool(plane.client.fleet.GetDevice(fleet_pb2.GetDeviceRequest(id="s3-dev"), timeout=5).online)
    except grpc.RpcError:
        return False


def test_a_local_disk_store_serves_through_download_and_plain_http_urls_need_consent(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey, bucket: Bucket,
) -> None:  # fmt: skip
    with plane_on(tmp_path / "local", mosquitto, trust, str(tmp_path / "blobs")) as plane:
        v1 = push(plane, tmp_path / "local", signing_key, 1, (1, 2, 3))
        with pytest.raises(grpc.RpcError) as info:
            plane.client.artifacts.GetChunkUrls(
                apb.GetChunkUrlsRequest(digest=v1.digest, chunks=sorted(all_chunk_digests(v1.manifest))),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Download" in (
            info.value.details() or ""
        )
        f = make_fetcher(tmp_path / "local", plane)
        report = fetch(f, v1)
        assert (report.transport, report.bytes_fetched) == ("grpc", v1.size)
        presigned = f.transports[0]
        with pytest.raises(UrlsNotOfferedError):  # remembered: no second question for a while
            list(presigned.fetch_chunks(v1.digest, sorted(all_chunk_digests(v1.manifest))[:1]))
    with plane_on(tmp_path / "s3", mosquitto, trust, bucket.url) as plane:
        v1 = push(plane, tmp_path / "s3", signing_key, 1, (1, 2, 3))
        https_only = fetch(make_fetcher(tmp_path / "s3", plane, allow_http=False), v1)
        assert (https_only.transport, https_only.bytes_fetched) == ("grpc", v1.size)
        with pytest.raises(FetchError, match="only https"):
            fetch(make_fetcher(tmp_path / "s3-only", plane, allow_http=False, fallback=False), v1)
        # The URL itself: the object named by its digest, answered with a cache-forever header.
        chunk = sorted(all_chunk_digests(v1.manifest))[0]
        answer = plane.client.artifacts.GetChunkUrls(
            apb.GetChunkUrlsRequest(digest=v1.digest, chunks=[chunk, chunk]), timeout=10
        )
        assert [u.chunk_digest for u in answer.urls] == [chunk]
        assert chunk.removeprefix("sha256:") in answer.urls[0].url
        with urllib.request.urlopen(answer.urls[0].url, timeout=10) as resp:
            assert resp.headers.get("Cache-Control") == IMMUTABLE
            assert len(resp.read()) == answer.urls[0].size == chunk_sizes(v1.manifest)[chunk]


def test_a_fallback_to_download_is_not_for_good_and_every_device_gets_the_same_url(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey,
    bucket: Bucket, proxy: TcpProxy,
) -> None:  # fmt: skip
    with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
        v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
        v2 = push(plane, tmp_path, signing_key, 2, (1, 2, 4))
        grpc_transport = GrpcTransport(plane.address, timeout_s=10)
        f = ArtifactFetcher(
            LocalBlobStore(tmp_path / "device-chunks"),
            [
                PresignedTransport(grpc_transport, allow_http=True, timeout_s=2, resume_tries=0),
                grpc_transport,
            ],
            FetchSettings(retry_base_s=0.05, retry_max_s=0.2, sticky_s=0.5),
        )
        proxy.cut()  # the bucket is unreachable from the device: Download carries the bytes
        assert fetch(f, v1).transport == "grpc"
        proxy.heal()
        time.sleep(0.6)  # past sticky_s: the presigned transport gets its turn again
        assert (fetch(f, v2).transport, proxy.injected.downstream_bytes > 0) == ("presigned", True)
        # One URL per chunk per window, whoever asks: a cache in front of the bucket sees one key.
        chunk = sorted(all_chunk_digests(v1.manifest))[:1]
        first = plane.client.artifacts.GetChunkUrls(apb.GetChunkUrlsRequest(digest=v1.digest, chunks=chunk))
        time.sleep(1.1)  # a fresh signature would carry another X-Amz-Date
        again = plane.client.artifacts.GetChunkUrls(apb.GetChunkUrlsRequest(digest=v1.digest, chunks=chunk))
        assert first.urls[0].url == again.urls[0].url and first.expires_at == again.expires_at


class CountingGrpcTransport(GrpcTransport):
    """The agent's gRPC transport, counting GetChunkUrls calls; ``old_answers`` makes every manifest
    answer one without URLs, as a control plane from before ``want_chunk_urls`` gives (it ignores
    the field it does not know, so its answer is exactly the one to a request without it)."""

    def __init__(self, address: str, old_answers: bool) -> None:
        super().__init__(address, timeout_s=10)
        self.old_answers = old_answers
        self.url_calls = 0

    def get_artifact(self, digest: str, want_chunk_urls: bool = False) -> apb.Artifact:
        return super().get_artifact(digest, want_chunk_urls and not self.old_answers)

    def chunk_urls(self, digest: str, chunks: list[str]) -> list[apb.ChunkUrl]:
        self.url_calls += 1
        return super().chunk_urls(digest, chunks)


@pytest.mark.parametrize("old_answers", [False, True], ids=["one-call", "older-control-plane"])
def test_the_manifest_answer_carries_the_urls_and_an_answer_without_them_falls_back(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey,
    bucket: Bucket, old_answers: bool,
) -> None:  # fmt: skip
    with plane_on(tmp_path, mosquitto, trust, bucket.url) as plane:
        v1 = push(plane, tmp_path, signing_key, 1, (1, 2, 3))
        rpc = CountingGrpcTransport(plane.address, old_answers)
        f = ArtifactFetcher(
            LocalBlobStore(tmp_path / "device-chunks"),
            [PresignedTransport(rpc, allow_http=True, timeout_s=5)],
            FetchSettings(max_rounds=1),
        )
        report = fetch(f, v1)
        assert (report.transport, report.bytes_fetched, report.corrupt_chunks) == ("presigned", v1.size, 0)
        assert rpc.url_calls == (1 if old_answers else 0)
        # An older agent asks without the field and gets the manifest alone, as before.
        art = plane.client.artifacts.Get(apb.GetArtifactRequest(artifact=v1.digest), timeout=10)
        assert not art.chunk_urls and not art.HasField("chunk_urls_expire_at") and art.manifest
