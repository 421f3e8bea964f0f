"""How an agent gets artifact bytes: gRPC from the control plane, or chunks over MQTT.

Each implements ``ArtifactTransport``: the manifest with its signatures, then chunks by digest.
None checks anything; ``ArtifactFetcher`` verifies every byte they hand over. The third way,
chunks straight from the blob store by presigned URL, is ``presigned.PresignedTransport``.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc

from edgectl.agent.errors import FetchError, UrlsNotOfferedError
from edgectl.protos.v1 import artifacts_pb2 as apb
from edgectl.protos.v1 import artifacts_pb2_grpc as apb_grpc
from edgectl.protos.v1 import mqtt_pb2 as mpb

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class ArtifactTransport(Protocol):
    """A narrow source of artifact bytes; errors are FetchError (the fetcher retries)."""

    name: str

    def get_manifest(self, digest: str) -> tuple[bytes, bytes]:
        """(canonical manifest bytes, signature bytes) of the artifact ``digest``."""
        ...

    def fetch_chunks(self, digest: str, chunks: list[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (claimed chunk digest, data) for the requested chunks of artifact ``digest``."""
        ...

    def close(self) -> None: ...


class GrpcTransport:
    """ArtifactService.Get and Download(chunks=...) against the control plane."""

    name = "grpc"

    def __init__(
        self,
        target: str,
        timeout_s: float = 10.0,
        stream_timeout_s: float = 600.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.stream_timeout_s = stream_timeout_s
        channel_options = [*GRPC_OPTIONS, *options]
        # mTLS with the enrolled client certificate when there is one; plaintext for a dev fleet.
        self._channel = (
            grpc.secure_channel(target, credentials, options=channel_options)
            if credentials is not None
            else grpc.insecure_channel(target, options=channel_options)
        )
        self._stub = apb_grpc.ArtifactServiceStub(self._channel)

    def get_manifest(self, digest: str) -> tuple[bytes, bytes]:
        art = self.get_artifact(digest)
        return bytes(art.manifest), bytes(art.signatures)

    def get_artifact(self, digest: str, want_chunk_urls: bool = False) -> apb.Artifact:
        """The artifact's record (manifest, signatures); with ``want_chunk_urls`` also its chunks'
        presigned URLs where the control plane offers them (none from an older one)."""
        request = apb.GetArtifactRequest(artifact=digest, want_chunk_urls=want_chunk_urls)
        try:
            art: apb.Artifact = self._stub.Get(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise FetchError(
                f"control plane {self.target}: Get {digest}: {exc.code().name} {exc.details()}"
            ) from exc
        return art

    def chunk_urls(self, digest: str, chunks: list[str]) -> list[apb.ChunkUrl]:
        """Presigned blob-store URLs for ``chunks``; UrlsNotOfferedError when the store has none."""
        try:
            answer = self._stub.GetChunkUrls(
                apb.GetChunkUrlsRequest(digest=digest, chunks=chunks), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            # FAILED_PRECONDITION: a local-disk blob store; UNIMPLEMENTED: an older control plane.
            offered = exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
            error = FetchError if offered else UrlsNotOfferedError
            raise error(
                f"control plane {self.target}: GetChunkUrls {digest}: {exc.code().name} {exc.details()}"
            ) from exc
        return list(answer.urls)

    def fetch_chunks(self, digest: str, chunks: list[str]) -> Iterator[tuple[str, bytes]]:
        # The fetcher asks for a bounded batch of chunks per call, so one generous deadline
        # catches a stalled stream without cutting a slow but live link short.
        stream = self._stub.Download(
            apb.DownloadRequest(digest=digest, chunks=chunks), timeout=self.stream_timeout_s
        )
        try:
            for msg in stream:
                yield msg.chunk_digest, bytes(msg.data)
        except grpc.RpcError as exc:
            raise FetchError(
                f"control plane {self.target}: Download {digest}: {exc.code().name} {exc.details()}"
            ) from exc
        finally:
            stream.cancel()

    def close(self) -> None:
        self._channel.close()


class MqttChunkTransport:
    """ChunkRequest on ``.../chunks/request``, ChunkData answers on ``.../chunks/data``."""

    name = "mqtt"

    def __init__(self, publish: Callable[[mpb.ChunkRequest], None], idle_timeout_s: float = 10.0) -> None:
        self._publish = publish
        self.idle_timeout_s = idle_timeout_s
        self._waiting: dict[str, queue.Queue[mpb.ChunkData]] = {}
        self._lock = threading.Lock()

    def deliver(self, data: mpb.ChunkData) -> None:
        """Called from the MQTT callback: hand the chunk to its waiting request, never block."""
        with self._lock:
            q = self._waiting.get(data.request_id)
        if q is not None:
            q.put_nowait(data)

    def _request(self, digest: str, wanted: list[str], manifest: bool = False) -> Iterator[mpb.ChunkData]:
        request_id = uuid.uuid4().hex
        q: queue.Queue[mpb.ChunkData] = queue.Queue()
        with self._lock:
            self._waiting[request_id] = q
        try:
            self._publish(
                mpb.ChunkRequest(
                    request_id=request_id, artifact_digest=digest, chunk_digests=wanted, manifest=manifest
                )
            )
            while True:
                try:
                    msg = q.get(timeout=self.idle_timeout_s)
                except queue.Empty:
                    raise FetchError(
                        f"no chunk data over MQTT for {self.idle_timeout_s:.0f} s (request {request_id})"
                    ) from None
                if msg.error:
                    raise FetchError(f"control plane could not send chunks over MQTT: {msg.error}")
                yield msg
                if msg.last:
                    return
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)

    def get_manifest(self, digest: str) -> tuple[bytes, bytes]:
        for msg in self._request(digest, [], manifest=True):
            if msg.manifest:
                return bytes(msg.manifest), bytes(msg.signatures)
        raise FetchError(f"the MQTT answer for {digest} lacks the manifest")

    def fetch_chunks(self, digest: str, chunks: list[str]) -> Iterator[tuple[str, bytes]]:
        for msg in self._request(digest, chunks):
            if msg.chunk_digest:
                yield msg.chunk_digest, bytes(msg.data)

    def close(self) -> None:
        with self._lock:
            self._waiting.clear()
