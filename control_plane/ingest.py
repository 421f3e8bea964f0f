"""The leader's MQTT loop: drain the bus inbox in batches, store reports, answer chunk requests.

One batch (up to ``BATCH``) becomes one transaction, then the controller is woken. A
(re)connect marker republishes every stored desired state, which heals a publish lost between
a commit and a crash. Chunk requests go to their own worker so a big transfer never delays
health reports.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from edgectl.artifact import BlobStoreError
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.bus import CONNECTED, FleetBus, Inbound
from edgectl.control_plane.desired import all_publications
from edgectl.control_plane.errors import ControlPlaneError
from edgectl.control_plane.fleet import Fleet, Reported, Status
from edgectl.control_plane.store import StateStore
from edgectl.mqtt.wire import DeviceTopics, PayloadError, decode, encode, parse_topic
from edgectl.protos.v1 import mqtt_pb2

log = logging.getLogger(__name__)
BATCH = 500
MAX_CHUNKS_PER_REQUEST = 256


class ChunkServer:
    """Answers ChunkRequests on a device's chunks/data topic, one ChunkData per chunk."""

    def __init__(self, artifacts: ArtifactStore, bus: FleetBus) -> None:
        self.artifacts = artifacts
        self.bus = bus
        self.requests: queue.Queue[tuple[str, mqtt_pb2.ChunkRequest] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mqtt-chunks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.requests.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self.requests.get()) is not None:
            device_id, request = item
            try:
                self.answer(device_id, request)
            except Exception:
                log.exception("chunk request failed", extra={"device_id": device_id})
                # Tell the device at once rather than leave it waiting out its idle timeout.
                failed = mqtt_pb2.ChunkData(
                    request_id=request.request_id, error="the control plane failed to answer", last=True
                )
                with contextlib.suppress(Exception):
                    self.bus.publish(DeviceTopics(device_id).chunk_data, encode(failed), qos=1)

    def answer(self, device_id: str, request: mqtt_pb2.ChunkRequest) -> None:
        topic = DeviceTopics(device_id).chunk_data
        wanted = list(request.chunk_digests)
        if request.manifest:
            self._answer_manifest(topic, request)
            return
        try:
            if not wanted:
                raise ControlPlaneError("the request names no chunks")
            if len(wanted) > MAX_CHUNKS_PER_REQUEST:
                raise ControlPlaneError(f"ask for at most {MAX_CHUNKS_PER_REQUEST} chunks per request")
            pieces = list(self.artifacts.download_chunks(request.artifact_digest, wanted))
        except (ControlPlaneError, BlobStoreError) as exc:
            error = mqtt_pb2.ChunkData(request_id=request.request_id, error=str(exc), last=True)
            self.bus.publish(topic, encode(error), qos=1)
            return
        for i, piece in enumerate(pieces):
            message = mqtt_pb2.ChunkData(
                request_id=request.request_id,
                chunk_digest=piece.digest,
                data=piece.data,
                last=i == len(pieces) - 1,
            )
            self.bus.publish(topic, encode(message), qos=1)

    def _answer_manifest(self, topic: str, request: mqtt_pb2.ChunkRequest) -> None:
        """The signed manifest, as gRPC's ArtifactService.Get gives it; the agent verifies it."""
        try:
            record = self.artifacts.get(request.artifact_digest)
        except ControlPlaneError as exc:
            answer = mqtt_pb2.ChunkData(request_id=request.request_id, error=str(exc), last=True)
        else:
            answer = mqtt_pb2.ChunkData(
                request_id=request.request_id,
                manifest=record.manifest_bytes,
                signatures=record.signatures,
                last=True,
            )
        self.bus.publish(topic, encode(answer), qos=1)


class FleetIngest:
    """Consumes the bus inbox while this replica leads."""

    def __init__(
        self,
        store: StateStore,
        fleet: Fleet,
        bus: FleetBus,
        chunks: ChunkServer,
        wake: Callable[[], None],
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.bus = bus
        self.chunks = chunks
        self.wake = wake
        self.count = count or (lambda kind: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.bus.inbox.put(Inbound("$stop", b""))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.bus.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self.bus.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self.handle(batch)
            except Exception:
                log.exception("MQTT ingest batch failed", extra={"messages": len(batch)})
                self.count("ingest_error")
                time.sleep(0.5)

    def handle(self, batch: list[Inbound]) -> None:
        """Decode and store one batch; republish desired state after a (re)connect."""
        observations: list[Reported | Status] = []
        now = time.time()
        for item in batch:
            if item.topic == CONNECTED:
                self.republish()
                continue
            if item.topic.startswith("$") or not item.payload:
                continue  # control markers, and retained messages being cleared
            try:
                device_id, kind = parse_topic(item.topic)
                if kind == "reported":
                    state = decode(item.payload, mqtt_pb2.ReportedState)
                    # Seen now, by our clock (a device's clock may be days off); a retained replay
                    # was sent earlier, and only the device's own timestamp says when.
                    seen = now
                    if item.retained and state.HasField("reported_at"):
                        seen = min(now, state.reported_at.ToNanoseconds() / 1e9)
                    observations.append(Reported(device_id, state, seen))
                elif kind == "status":
                    status = decode(item.payload, mqtt_pb2.DeviceStatus)
                    observations.append(Status(device_id, status.online, now))
                elif kind == "events":
                    self._event(device_id, decode(item.payload, mqtt_pb2.DeviceEvent))
                elif kind == "chunks/request":
                    self.chunks.requests.put((device_id, decode(item.payload, mqtt_pb2.ChunkRequest)))
                self.count(kind)
            except PayloadError as exc:
                self.count("bad_payload")
                log.warning(
                    "ignored a malformed MQTT message", extra={"topic": item.topic, "error": str(exc)}
                )
            except ControlPlaneError as exc:
                log.warning("ignored an MQTT message", extra={"topic": item.topic, "error": str(exc)})
        if observations:
            self.fleet.apply(observations)
            self.wake()

    def republish(self) -> None:
        with self.store.tx() as tx:
            publications = all_publications(tx)
        self.bus.publish_desired(publications)
        log.info("republished desired state", extra={"devices": len(publications)})

    @staticmethod
    def _event(device_id: str, event: mqtt_pb2.DeviceEvent) -> None:
        if event.kind in (mqtt_pb2.EVENT_KIND_FAILED, mqtt_pb2.EVENT_KIND_REFUSED):
            log.warning(
                "device event",
                extra={
                    "device_id": device_id,
                    "kind": mqtt_pb2.EventKind.Name(event.kind),
                    "detail": event.message,
                },
            )
