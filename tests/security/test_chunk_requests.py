"""Chunk requests over MQTT cannot make the control plane load or send more than they are worth.

A real control plane and a real mosquitto; the attacker is a plain MQTT client that publishes
ChunkRequests for its own device id, as any broker-only agent does. The blob store the control
plane reads from counts its loads, so "loaded once" is observed, not inferred.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgectl.artifact import LocalBlobStore, SigningKey, TensorSpec, TrustStore, build_artifact, verify_chunk
from edgectl.broker import MosquittoProcess
from edgectl.client import ControlPlaneClient, push_artifact
from edgectl.control_plane.chunk_server import ChunkLimits
from edgectl.control_plane.config import ControlPlaneConfig
from edgectl.control_plane.server import ControlPlane
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import mqtt_pb2
from tests.harness.mqtt import MqttTestClient


class CountingBlobs(LocalBlobStore):
    """The control plane's own blob directory, counting every chunk it loads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loads: Counter[str] = Counter()

    def get(self, digest: str) -> bytes:
        self.loads[digest] += 1
        return super().get(digest)


@dataclass
class Served:
    plane: ControlPlane
    blobs: CountingBlobs
    digest: str
    chunks: dict[str, int]  # chunk digest -> size, in manifest order


@pytest.fixture
def served(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore, signing_key: SigningKey
) -> Iterator[Served]:
    plane = ControlPlane(
        ControlPlaneConfig(
            listen="127.0.0.1:0",
            insecure=True,
            mqtt_url=mosquitto.url,
            state_url=f"sqlite:///{tmp_path}/cp.db",
            blobs=str(tmp_path / "blobs"),
            tick_seconds=0.1,
            leader_interval=0.2,
        ),
        trust=trust,
    )
    plane.start()
    try:
        assert plane.election.leading.wait(10) and plane.bus.wait_connected(10)
        src = tmp_path / "model.onnx"
        src.write_bytes(np.random.default_rng(7).bytes(2_000_000))
        art = build_artifact(
            tmp_path / "bundle",
            name="chunky",
            version=1,
            files={"model.onnx": src},
            input_signature=[TensorSpec("x", "float32", ("batch", 4))],
            output_signature=[TensorSpec("y", "float32", ("batch", 2))],
            golden_inputs={"x": np.ones((1, 4), dtype=np.float32)},
            golden_outputs={"y": np.zeros((1, 2), dtype=np.float32)},
            recipe={"passes": []},
            target_profile="x86-cpu-avx2",
            metrics={},
            precision_map={},
            source_model_sha256="ab" * 32,
            signing_key=signing_key,
            created="2024-05-01T12:00:00Z",
            host="test",
        )
        with ControlPlaneClient(plane.address, timeout=20) as client:
            digest = push_artifact(client, art.root).artifact.ref.digest
        blobs = CountingBlobs(tmp_path / "blobs")
        plane.artifacts.blobs = blobs  # the same directory, now with a counter on every load
        chunks = {c.digest: c.size for c in art.manifest.file("model.onnx").chunks}
        assert len(chunks) >= 4, "the test needs an artifact of several chunks"
        yield Served(plane, blobs, digest, chunks)
    finally:
        plane.stop(grace=0)


@pytest.fixture
def device(mosquitto: MosquittoProcess) -> Iterator[MqttTestClient]:
    """An MQTT client speaking for one device id (any client can, on a broker without ACLs)."""
    client = MqttTestClient(mosquitto.host, mosquitto.port)
    assert not client.connect(timeout=10).is_failure
    yield client
    client.close()


def ask(client: MqttTestClient, device_id: str, artifact: str, chunks: list[str]) -> list[mqtt_pb2.ChunkData]:
    """Publish one ChunkRequest and collect its answers up to the one marked last."""
    topics = DeviceTopics(device_id)
    client.subscribe(topics.chunk_data)
    request_id = uuid.uuid4().hex
    client.publish(
        topics.chunk_requests,
        encode(mqtt_pb2.ChunkRequest(request_id=request_id, artifact_digest=artifact, chunk_digests=chunks)),
    )
    answers: list[mqtt_pb2.ChunkData] = []
    while not answers or not answers[-1].last:
        msg = decode(client.expect(timeout=15).payload, mqtt_pb2.ChunkData)
        assert msg.request_id == request_id
        answers.append(msg)
    assert client.nothing_arrives(within=1.0), "more answers arrived after the one marked last"
    return answers


def test_a_chunk_named_256_times_is_loaded_and_sent_once(served: Served, device: MqttTestClient) -> None:
    first, *_ = served.chunks
    answers = ask(device, "attacker-1", served.digest, [first] * 256)
    assert [(a.chunk_digest, a.error) for a in answers] == [(first, "")]
    verify_chunk(answers[0].data, first, served.chunks[first])
    assert served.blobs.loads[first] == 1, f"loaded {served.blobs.loads[first]} times"

    # Positive control: distinct chunks are each loaded and sent once, in order, the last marked.
    rest = list(served.chunks)[1:]
    answers = ask(device, "legit-1", served.digest, rest)
    assert [a.chunk_digest for a in answers] == rest and answers[-1].last and not answers[0].last
    for a in answers:
        verify_chunk(a.data, a.chunk_digest, served.chunks[a.chunk_digest])
    assert all(served.blobs.loads[d] == 1 for d in rest)


def test_a_request_over_its_caps_is_refused_before_anything_is_loaded(
    served: Served, device: MqttTestClient
) -> None:
    digests = list(served.chunks)
    too_many = ask(device, "attacker-2", served.digest, digests * 65)  # > 256 names
    assert len(too_many) == 1 and "at most 256 chunks" in too_many[0].error and too_many[0].last
    served.plane.chunks.limits = ChunkLimits(max_request_bytes=sum(served.chunks.values()) - 1)
    too_big = ask(device, "attacker-2", served.digest, digests)
    assert len(too_big) == 1 and "ask for at most" in too_big[0].error
    unknown = ask(device, "attacker-2", served.digest, ["sha256:" + "0" * 64])
    assert len(unknown) == 1 and "not part of artifact" in unknown[0].error
    assert sum(served.blobs.loads.values()) == 0, "a refused request loaded chunks"

    # Positive control: the same chunks, split under the byte cap, are served.
    answers = ask(device, "attacker-2", served.digest, digests[:2])
    assert [a.chunk_digest for a in answers] == digests[:2] and not any(a.error for a in answers)


def test_each_device_has_a_byte_budget_per_window(served: Served, device: MqttTestClient) -> None:
    a, b, c, *_ = served.chunks
    sizes = served.chunks
    served.plane.chunks.limits = ChunkLimits(
        device_bytes_per_window=sizes[a] + sizes[b] + sizes[c] // 2, window_s=600
    )
    assert [x.chunk_digest for x in ask(device, "greedy-1", served.digest, [a])] == [a]
    assert [x.chunk_digest for x in ask(device, "greedy-1", served.digest, [b])] == [b]
    refused = ask(device, "greedy-1", served.digest, [c])
    assert len(refused) == 1 and refused[0].last and "window" in refused[0].error, refused[0]
    assert served.blobs.loads[c] == 0, "a chunk over the budget was loaded"

    # Positive control: the budget is per device; another device still gets the same chunk.
    assert [x.chunk_digest for x in ask(device, "patient-1", served.digest, [c])] == [c]
    assert served.blobs.loads[c] == 1
