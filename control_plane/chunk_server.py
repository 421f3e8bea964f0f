"""Artifact bytes over MQTT, for sites that reach only the broker: answers ChunkRequests.

A device asks on ``.../chunks/request`` for the signed manifest or for chunks by digest; the
answers go to its ``.../chunks/data`` topic, one ChunkData per chunk, the last one marked. The
device verifies everything it receives; this side bounds what one device can make it do: each
chunk is loaded and sent once per request (duplicates are dropped), one at a time with at most
a few in flight, a request is capped in chunks and bytes, and each device has a byte budget per
time window. A refusal is the usual failure answer (``error``, ``last``), so the agent backs off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edgectl.artifact import BlobStoreError
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.bus import FleetBus
from edgectl.control_plane.errors import ControlPlaneError, InvalidArgument
from edgectl.control_plane.limits import LimitExceeded, PeerBudget
from edgectl.logs import name_os_thread
from edgectl.mqtt.wire import DeviceTopics, PayloadError, decode, encode, parse_topic
from edgectl.protos.v1 import mqtt_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkLimits:
    """What one device may ask of the chunk server."""

    max_chunks: int = 256  # digests named in one request (the agent asks for 32)
    max_request_bytes: int = 64 << 20  # bytes of the distinct chunks of one request
    device_bytes_per_window: int = 1 << 30  # bytes sent to one device per window
    window_s: float = 60.0
    in_flight: int = 4  # chunks handed to the broker link and not yet acknowledged
    publish_timeout_s: float = 30.0  # a chunk the broker does not take in this time ends the answer


class ChunkServer:
    """Answers ChunkRequests on a device's chunks/data topic from its own worker thread."""

    def __init__(
        self,
        artifacts: ArtifactStore,
        bus: FleetBus,
        limits: ChunkLimits | None = None,
        deployed: Callable[[str], set[str]] | None = None,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.count = count or (lambda kind: None)  # the MQTT message counter, as the ingest's
        self.bus = bus
        self.limits = limits or ChunkLimits()
        # device id -> digests it may fetch (a secured fleet, where the broker vouches for the topic's device)
        self.deployed = deployed
        self.requests: queue.Queue[tuple[str, mqtt_pb2.ChunkRequest] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mqtt-chunks", daemon=True)

    @property
    def limits(self) -> ChunkLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: ChunkLimits) -> None:
        """New limits start each device's byte budget afresh (a budget is one token per byte)."""
        self._limits = limits
        self.budget = PeerBudget(
            limits.device_bytes_per_window, limits.window_s / max(1, limits.device_bytes_per_window)
        )

    def start(self) -> None:
        self._thread.start()

    def submit(self, topic: str, payload: bytes) -> None:
        """Queue one ChunkRequest as it arrived from the broker (any replica answers; no leader needed)."""
        try:
            device_id, kind = parse_topic(topic)
            if kind != "chunks/request":
                return
            self.requests.put((device_id, decode(payload, mqtt_pb2.ChunkRequest)))
            self.count(kind)
        except PayloadError as exc:
            self.count("bad_payload")
            log.warning("ignored a malformed chunk request", extra={"topic": topic, "error": str(exc)})

    def stop(self) -> None:
        self.requests.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        name_os_thread()
        while (item := self.requests.get()) is not None:
            device_id, request = item
            try:
                self.answer(device_id, request)
            except Exception:
                log.exception("chunk request failed", extra={"device_id": device_id})
                # Tell the device at once rather than leave it waiting out its idle timeout.
                with contextlib.suppress(Exception):
                    self._fail(device_id, request, "the control plane failed to answer")

    def _fail(self, device_id: str, request: mqtt_pb2.ChunkRequest, error: str) -> None:
        answer = mqtt_pb2.ChunkData(request_id=request.request_id, error=error, last=True)
        self.bus.publish(DeviceTopics(device_id).chunk_data, encode(answer), qos=1)

    def answer(self, device_id: str, request: mqtt_pb2.ChunkRequest) -> None:
        """Send the manifest or the requested chunks, or one failure answer saying why not."""
        if self.deployed is not None and request.artifact_digest not in self.deployed(device_id):
            self._fail(
                device_id,
                request,
                f"artifact {request.artifact_digest[:80]} is not deployed to device {device_id}",
            )
            return
        if request.manifest:
            self._answer_manifest(device_id, request)
            return
        try:
            wanted = self._admit(device_id, request)
            pieces = self.artifacts.download_chunks(request.artifact_digest, wanted)
            topic = DeviceTopics(device_id).chunk_data
            pending: deque[mqtt.MQTTMessageInfo] = deque()
            for i, piece in enumerate(pieces):  # a generator: each chunk is loaded when it is sent
                message = mqtt_pb2.ChunkData(
                    request_id=request.request_id,
                    chunk_digest=piece.digest,
                    data=piece.data,
                    last=i == len(wanted) - 1,
                )
                pending.append(self.bus.publish(topic, encode(message), qos=1))
                if len(pending) >= self.limits.in_flight and not self._delivered(pending.popleft()):
                    log.warning("broker link stalled; chunk answer abandoned", extra={"device_id": device_id})
                    return  # the device times out and asks again; nothing more is loaded
        except (ControlPlaneError, BlobStoreError) as exc:
            self._fail(device_id, request, str(exc))

    def _admit(self, device_id: str, request: mqtt_pb2.ChunkRequest) -> list[str]:
        """The distinct requested chunks, once the request fits its caps and the device's budget."""
        limits = self.limits
        if not request.chunk_digests:
            raise InvalidArgument("the request names no chunks")
        if len(request.chunk_digests) > limits.max_chunks:
            raise InvalidArgument(f"ask for at most {limits.max_chunks} chunks per request")
        wanted, where = self.artifacts.requested_chunks(request.artifact_digest, request.chunk_digests)
        size = sum(where[d][0].size for d in wanted)
        if size > limits.max_request_bytes:
            raise InvalidArgument(
                f"the request asks for {size} bytes; ask for at most {limits.max_request_bytes} at once"
            )
        wait = self.budget.take(device_id, size)
        if wait:
            when = f"ask again in {wait:.0f} s" if wait != math.inf else "ask for fewer chunks at once"
            raise LimitExceeded(
                f"device {device_id} may pull {limits.device_bytes_per_window} bytes of chunks per "
                f"{limits.window_s:.0f} s window; this request asks for {size}: {when}"
            )
        return wanted

    def _delivered(self, info: mqtt.MQTTMessageInfo) -> bool:
        """Wait until the broker link took the message (QoS 1: acknowledged); False if it did not."""
        try:
            info.wait_for_publish(self.limits.publish_timeout_s)
        except (RuntimeError, ValueError):
            return False
        return bool(info.is_published())

    def _answer_manifest(self, device_id: str, request: mqtt_pb2.ChunkRequest) -> None:
        """The signed manifest, as gRPC's ArtifactService.Get gives it; the agent verifies it."""
        try:
            record = self.artifacts.get(request.artifact_digest)
        except ControlPlaneError as exc:
            self._fail(device_id, request, str(exc))
            return
        answer = mqtt_pb2.ChunkData(
            request_id=request.request_id,
            manifest=record.manifest_bytes,
            signatures=record.signatures,
            last=True,
        )
        self.bus.publish(DeviceTopics(device_id).chunk_data, encode(answer), qos=1)
