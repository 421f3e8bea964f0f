"""A minimal real ArtifactService (Get + Download) over a real socket, with fault injection.

Serves artifacts from a LocalBlobStore the way the control plane does, so agent tests never
import control_plane; tests/contracts/test_contract_artifact_service.py holds the two to the
same behaviour. Faults: corrupt chunks (once each), drop the stream
after N chunks, slow every chunk down. Also answers ChunkRequests over MQTT for broker-only sites.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    LocalBlobStore,
    Manifest,
    chunk_locations,
    put_file_chunks,
)
from edgectl.artifact.canonical import sha256_digest
from edgectl.mqtt.wire import ALL_CHUNK_REQUESTS, DeviceTopics, decode, encode, parse_topic
from edgectl.protos.v1 import artifacts_pb2 as apb
from edgectl.protos.v1 import artifacts_pb2_grpc as apb_grpc
from edgectl.protos.v1 import common_pb2 as cpb
from edgectl.protos.v1 import mqtt_pb2 as mpb


@dataclass
class Faults:
    """What the server does wrong, on purpose."""

    corrupt: set[str] = field(default_factory=set)  # chunk digests to corrupt, once each
    drop_after: int | None = None  # abort each Download stream after this many chunks
    drop_times: int = 1  # how many streams to drop
    chunk_delay_s: float = 0.0
    unavailable: bool = False  # every call fails with UNAVAILABLE


class ArtifactStoreServer(apb_grpc.ArtifactServiceServicer):
    """Get and Download from a LocalBlobStore; counts what it served."""

    def __init__(self, root: Path) -> None:
        self.blobs = LocalBlobStore(root / "blobs")
        self.manifests: dict[str, tuple[bytes, bytes, Manifest]] = {}
        self.faults = Faults()
        self.served: Counter[str] = Counter()
        self.served_bytes = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        apb_grpc.add_ArtifactServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def add(self, bundle: Path) -> str:
        """Publish a built bundle directory; returns its digest."""
        manifest_bytes = (bundle / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_bytes(manifest_bytes)
        for entry in manifest.files:
            put_file_chunks(bundle / entry.path, entry, self.blobs)
        digest = sha256_digest(manifest_bytes)
        self.manifests[digest] = (manifest_bytes, (bundle / SIGNATURE_NAME).read_bytes(), manifest)
        return digest

    def start(self) -> ArtifactStoreServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0).wait()

    def _check(self, context: Any) -> None:
        if self.faults.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected outage")

    def Get(self, request: apb.GetArtifactRequest, context: Any) -> apb.Artifact:
        self._check(context)
        found = self.manifests.get(request.artifact)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown artifact {request.artifact}")
        manifest_bytes, sigs, m = found
        return apb.Artifact(
            ref=cpb.ArtifactRef(digest=request.artifact, name=m.name, version=m.version),
            manifest=manifest_bytes,
            signatures=sigs,
            total_size=sum(f.size for f in m.files),
        )

    def chunk_data(self, digest: str) -> bytes:
        data = self.blobs.get(digest)
        with self._lock:
            self.served[digest] += 1
            self.served_bytes += len(data)
            if digest in self.faults.corrupt:
                self.faults.corrupt.discard(digest)
                data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def Download(self, request: apb.DownloadRequest, context: Any) -> Iterator[apb.DownloadChunk]:
        self._check(context)
        found = self.manifests.get(request.digest)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown artifact {request.digest}")
        manifest = found[2]
        where = chunk_locations(manifest)
        if request.chunks:
            unknown = [d for d in request.chunks if d not in where]
            if unknown:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunks not in artifact: {unknown[:3]}")
            # As the control plane does: a chunk named twice is sent once.
            pieces = [(d, where[d][1].path, where[d][0].offset, 0) for d in dict.fromkeys(request.chunks)]
        elif request.path:
            # As the control plane does: the file from ``offset``, the first chunk cut at it.
            entry = next((f for f in manifest.files if f.path == request.path), None)
            if entry is None or not 0 <= request.offset <= entry.size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no file {request.path!r} at that offset")
            pieces = [
                (c.digest, entry.path, c.offset, max(0, request.offset - c.offset))
                for c in entry.chunks
                if c.offset + c.size > request.offset
            ]
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Download needs a file path or a list of chunks")
        for n, (digest, path, offset, skip) in enumerate(pieces):
            if (
                self.faults.drop_after is not None
                and n >= self.faults.drop_after
                and self.faults.drop_times > 0
            ):
                self.faults.drop_times -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected stream drop")
            if self.faults.chunk_delay_s:
                time.sleep(self.faults.chunk_delay_s)
            data = self.chunk_data(digest)[skip:]
            claimed = sha256_digest(data) if skip else digest
            yield apb.DownloadChunk(path=path, offset=offset + skip, chunk_digest=claimed, data=data)


class MqttChunkResponder:
    """The control plane's side of chunk transfer over the broker, for tests."""

    def __init__(self, server: ArtifactStoreServer, host: str, port: int) -> None:
        self.server = server
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="test-cp-chunks", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe(ALL_CHUNK_REQUESTS, qos=1)
        self.client.on_message = self._on_message
        self.requests: list[mpb.ChunkRequest] = []
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device_id, _ = parse_topic(msg.topic)
        req = decode(bytes(msg.payload), mpb.ChunkRequest)
        self.requests.append(req)
        topic = DeviceTopics(device_id).chunk_data
        found = self.server.manifests.get(req.artifact_digest)
        if found is None:
            client.publish(
                topic,
                encode(mpb.ChunkData(request_id=req.request_id, last=True, error="unknown artifact")),
                qos=1,
            )
            return
        if req.manifest:
            answer = mpb.ChunkData(
                request_id=req.request_id, manifest=found[0], signatures=found[1], last=True
            )
            client.publish(topic, encode(answer), qos=1)
            return
        wanted = list(dict.fromkeys(req.chunk_digests))  # as the control plane: each chunk once
        for i, digest in enumerate(wanted):
            data = self.server.chunk_data(digest)
            last = i == len(wanted) - 1
            client.publish(
                topic,
                encode(mpb.ChunkData(request_id=req.request_id, chunk_digest=digest, data=data, last=last)),
                qos=1,
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
