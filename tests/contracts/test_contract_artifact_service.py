"""The artifact download service as agents use it, checked against the test double and the real thing.

Agent tests fetch from ``tests/agent/artifact_server.py`` (a double of the control plane's
ArtifactService and MQTT chunk answers, with fault injection). Every test here runs twice: against
that double and against a real :class:`~edgectl.control_plane.server.ControlPlane` on free ports
with a real mosquitto, through the agent's own transports, so the double cannot promise agents
anything the control plane does not do (an MQTT manifest convention only the double answered
once hid a bug this way).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.agent.errors import FetchError
from edgectl.agent.transports import GrpcTransport, MqttChunkTransport
from edgectl.artifact import Manifest, SigningKey, TrustStore, all_chunk_digests, verify_manifest
from edgectl.artifact.canonical import sha256_digest
from edgectl.broker import MosquittoProcess
from edgectl.client import push_artifact
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import artifacts_pb2 as apb
from edgectl.protos.v1 import artifacts_pb2_grpc as apb_grpc
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.artifact_server import ArtifactStoreServer, MqttChunkResponder
from tests.agent.onnx_models import mlp_artifact
from tests.contracts.conftest import RealControlPlane

UNKNOWN = "sha256:" + "0" * 64


class ArtifactSource(Protocol):
    """What a test needs of either implementation."""

    address: str

    def publish(self, bundle: Path) -> str: ...

    def close(self) -> None: ...


class DoubleSource:
    """tests/agent/artifact_server.py with its MQTT responder, as agent tests run it."""

    def __init__(self, tmp: Path, broker: MosquittoProcess) -> None:
        self.server = ArtifactStoreServer(tmp / "double").start()
        self.responder = MqttChunkResponder(self.server, broker.host, broker.port)
        self.address = self.server.address

    def publish(self, bundle: Path) -> str:
        return self.server.add(bundle)

    def close(self) -> None:
        self.responder.close()
        self.server.stop()


class ControlPlaneSource(RealControlPlane):
    """The real control plane; artifacts arrive the way `edgectl artifact push` sends them."""

    def publish(self, bundle: Path) -> str:
        return push_artifact(self.client, bundle).artifact.ref.digest


@pytest.fixture(params=["double", "control-plane"])
def source(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore
) -> Iterator[ArtifactSource]:
    made: ArtifactSource = (
        DoubleSource(tmp_path, mosquitto)
        if request.param == "double"
        else ControlPlaneSource(tmp_path, mosquitto, trust)
    )
    try:
        yield made
    finally:
        made.close()


@dataclass
class Published:
    digest: str
    manifest: Manifest
    root: Path


@pytest.fixture
def published(source: ArtifactSource, tmp_path: Path, signing_key: SigningKey) -> Published:
    # Wide enough for several chunks per file, so order and offsets mean something.
    art = mlp_artifact(tmp_path / "bundle", tmp_path / "models", signing_key, dims=(64, 1024, 512, 8))
    digest = source.publish(art.root)
    manifest = Manifest.from_bytes((art.root / "manifest.json").read_bytes())
    assert len(all_chunk_digests(manifest)) >= 3, "the contract needs a multi-chunk artifact"
    return Published(digest, manifest, art.root)


def _chunks(manifest: Manifest) -> list[str]:
    """Every distinct chunk digest in manifest order (``all_chunk_digests`` is a set)."""
    return list(dict.fromkeys(c.digest for f in manifest.files for c in f.chunks))


def _where(manifest: Manifest) -> dict[str, tuple[str, int]]:
    """Chunk digest -> (file, offset) of its first occurrence."""
    where: dict[str, tuple[str, int]] = {}
    for f in manifest.files:
        for c in f.chunks:
            where.setdefault(c.digest, (f.path, c.offset))
    return where


def _stub(source: ArtifactSource) -> apb_grpc.ArtifactServiceStub:
    return apb_grpc.ArtifactServiceStub(grpc.insecure_channel(source.address))


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


# -- gRPC: ArtifactService.Get and Download --------------------------------------------------


def test_get_returns_the_signed_manifest_the_digest_names(
    source: ArtifactSource, published: Published, trust: TrustStore
) -> None:
    transport = GrpcTransport(source.address)
    try:
        manifest_bytes, signatures = transport.get_manifest(published.digest)
    finally:
        transport.close()
    assert sha256_digest(manifest_bytes) == published.digest
    verified = verify_manifest(manifest_bytes, signatures, trust)  # what the agent does next
    assert verified.manifest.version == published.manifest.version
    art = _stub(source).Get(apb.GetArtifactRequest(artifact=published.digest), timeout=10)
    assert (art.ref.digest, art.ref.name, art.ref.version) == (
        published.digest,
        published.manifest.name,
        published.manifest.version,
    )
    assert art.total_size == sum(f.size for f in published.manifest.files)


def test_get_of_an_unknown_artifact_is_not_found(source: ArtifactSource, published: Published) -> None:
    stub = _stub(source)
    assert _code(lambda: stub.Get(apb.GetArtifactRequest(artifact=UNKNOWN), timeout=10)) == (
        grpc.StatusCode.NOT_FOUND
    )
    transport = GrpcTransport(source.address)
    with pytest.raises(FetchError, match="NOT_FOUND"):
        transport.get_manifest(UNKNOWN)
    transport.close()


def test_download_by_chunk_list_streams_exactly_those_chunks_in_order(
    source: ArtifactSource, published: Published
) -> None:
    where = _where(published.manifest)
    chunks = _chunks(published.manifest)
    wanted = [chunks[2], chunks[0], chunks[-1]]  # out of manifest order on purpose
    got = list(
        _stub(source).Download(apb.DownloadRequest(digest=published.digest, chunks=wanted), timeout=30)
    )
    assert [c.chunk_digest for c in got] == wanted
    for c in got:
        assert "sha256:" + hashlib.sha256(c.data).hexdigest() == c.chunk_digest
        assert (c.path, c.offset) == where[c.chunk_digest]
    # The agent's transport sees the same pairs.
    transport = GrpcTransport(source.address)
    try:
        pairs = list(transport.fetch_chunks(published.digest, wanted))
    finally:
        transport.close()
    assert [(d, bytes(c.data)) for d, c in zip(wanted, got, strict=True)] == pairs


def test_download_by_path_from_an_offset_covers_the_rest_of_the_file(
    source: ArtifactSource, published: Published
) -> None:
    entry = max(published.manifest.files, key=lambda f: f.size)
    offset = entry.chunks[1].offset + 7  # inside the second chunk
    request = apb.DownloadRequest(digest=published.digest, path=entry.path, offset=offset)
    got = list(_stub(source).Download(request, timeout=30))
    assert got[0].offset == offset
    assert all(c.path == entry.path for c in got)
    assert all("sha256:" + hashlib.sha256(c.data).hexdigest() == c.chunk_digest for c in got)
    whole = (published.root / entry.path).read_bytes()
    assert b"".join(c.data for c in got) == whole[offset:]


@pytest.mark.parametrize(
    ("request_for", "code"),
    [
        (lambda d, chunks: apb.DownloadRequest(digest=UNKNOWN, chunks=chunks[:1]), grpc.StatusCode.NOT_FOUND),
        (lambda d, chunks: apb.DownloadRequest(digest=d, chunks=[UNKNOWN]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda d, chunks: apb.DownloadRequest(digest=d), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["unknown-artifact", "chunk-outside-the-artifact", "neither-path-nor-chunks"],
)
def test_a_download_that_cannot_be_served_fails_with_its_code_and_no_data(
    source: ArtifactSource, published: Published, request_for: Any, code: grpc.StatusCode
) -> None:
    request = request_for(published.digest, _chunks(published.manifest))
    stream = _stub(source).Download(request, timeout=30)
    received: list[Any] = []
    assert _code(lambda: received.extend(stream)) == code
    assert received == []


# -- MQTT: ChunkRequest / ChunkData ------------------------------------------------------------


class DeviceEnd:
    """The agent's MQTT chunk transport on a real broker connection, as device ``device_id``."""

    def __init__(self, broker: MosquittoProcess, device_id: str = "contract-dev") -> None:
        self.topics = DeviceTopics(device_id)
        self.raw: list[mpb.ChunkData] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgectl-agent-{device_id}", protocol=mqtt.MQTTv5
        )
        subscribed = threading.Event()
        self.transport = MqttChunkTransport(
            lambda req: self.client.publish(self.topics.chunk_requests, encode(req), qos=1), idle_timeout_s=10
        )

        def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
            data = decode(bytes(msg.payload), mpb.ChunkData)
            self.raw.append(data)
            self.transport.deliver(data)

        self.client.on_message = on_message
        self.client.on_connect = lambda c, *_: c.subscribe(self.topics.chunk_data, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "the device end did not subscribe"

    def close(self) -> None:
        self.transport.close()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device_end(mosquitto: MosquittoProcess) -> Iterator[DeviceEnd]:
    end = DeviceEnd(mosquitto)
    try:
        yield end
    finally:
        end.close()


def test_mqtt_manifest_request_is_answered_with_the_signed_manifest_in_one_last_message(
    source: ArtifactSource, published: Published, device_end: DeviceEnd, trust: TrustStore
) -> None:
    manifest_bytes, signatures = device_end.transport.get_manifest(published.digest)
    assert sha256_digest(manifest_bytes) == published.digest
    verify_manifest(manifest_bytes, signatures, trust)
    assert [m.last for m in device_end.raw] == [True]
    assert not device_end.raw[0].chunk_digest  # a manifest answer carries no chunk


def test_mqtt_chunk_request_is_answered_chunk_by_chunk_with_last_on_the_final_one(
    source: ArtifactSource, published: Published, device_end: DeviceEnd
) -> None:
    chunks = _chunks(published.manifest)
    wanted = [chunks[1], chunks[0]]
    pairs = list(device_end.transport.fetch_chunks(published.digest, wanted))
    assert [d for d, _ in pairs] == wanted
    assert all("sha256:" + hashlib.sha256(data).hexdigest() == d for d, data in pairs)
    assert [m.last for m in device_end.raw] == [False, True]
    assert len({m.request_id for m in device_end.raw}) == 1


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "chunks"])
def test_mqtt_request_for_an_unknown_artifact_gets_one_error_message(
    source: ArtifactSource, published: Published, device_end: DeviceEnd, manifest: bool
) -> None:
    with pytest.raises(FetchError, match="could not send"):
        if manifest:
            device_end.transport.get_manifest(UNKNOWN)
        else:
            list(device_end.transport.fetch_chunks(UNKNOWN, _chunks(published.manifest)[:1]))
    assert len(device_end.raw) == 1
    assert device_end.raw[0].error and device_end.raw[0].last


def test_a_chunk_named_twice_is_sent_once_over_grpc_and_mqtt(
    source: ArtifactSource, published: Published, device_end: DeviceEnd
) -> None:
    chunks = _chunks(published.manifest)
    wanted = [chunks[0], chunks[1], chunks[0], chunks[1], chunks[0]]
    got = list(
        _stub(source).Download(apb.DownloadRequest(digest=published.digest, chunks=wanted), timeout=30)
    )
    assert [c.chunk_digest for c in got] == chunks[:2]
    pairs = list(device_end.transport.fetch_chunks(published.digest, wanted))
    assert [d for d, _ in pairs] == chunks[:2]
    assert [m.last for m in device_end.raw] == [False, True]
