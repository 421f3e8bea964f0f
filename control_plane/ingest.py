"""The leader's MQTT loop: drain the bus inbox in batches, store reports and events.

A batch is what arrives within ``COALESCE_S`` of its first message (up to ``BATCH``), so a busy
fleet's reports share a transaction; it becomes one transaction, then the controller is woken
for the devices whose rows changed. A report that changes nothing but its timestamp (a
heartbeat) is neither decoded nor written: its last-seen time is written in bulk later
(``stored_reports.py`` says what a crash loses). A
(re)connect marker republishes every stored desired state, which heals a publish lost between
a commit and a crash. Chunk requests never come here: every replica takes them through a
shared subscription (``chunk_server.py``), so they need no leader and never delay health reports.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edgectl.control_plane.bus import CONNECTED, FleetBus, Inbound
from edgectl.control_plane.device_state import Reported, Status
from edgectl.control_plane.errors import ControlPlaneError
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.store import StateStore
from edgectl.control_plane.stored_reports import StoredReports, report_key
from edgectl.logs import name_os_thread
from edgectl.mqtt.wire import (
    PayloadError,
    decode,
    from_json,
    load_json,
    parse_site_bridge,
    parse_topic,
    peek,
)
from edgectl.protos.v1 import mqtt_pb2

log = logging.getLogger(__name__)
BATCH = 500
# How long a batch waits for more after its first message: the latency a report may gain before
# it is stored, bought back many times over by the controller's own 0.25 s gap between steps.
COALESCE_S = 0.05
# The events the control plane acts on (it logs them); the rest (progress, heartbeats, stages) are
# for people watching the broker, so only their kind is read. proto3 JSON may name or number it.
_LOGGED_EVENTS = frozenset(
    name_or_number
    for kind in (mqtt_pb2.EVENT_KIND_FAILED, mqtt_pb2.EVENT_KIND_REFUSED)
    for name_or_number in (mqtt_pb2.EventKind.Name(kind), int(kind))
)


def _logged(kind: object) -> bool:
    return isinstance(kind, (str, int)) and kind in _LOGGED_EVENTS


class FleetIngest:
    """Consumes the bus inbox while this replica leads."""

    def __init__(
        self,
        store: StateStore,
        fleet: Fleet,
        bus: FleetBus,
        wake: Callable[[set[str]], None],
        count: Callable[[str], None] | None = None,
        *,
        republish: Callable[[], int],
        on_reported: Callable[[str, mqtt_pb2.ReportedState], None] | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.bus = bus
        self.wake = wake
        self.count = count or (lambda kind: None)
        self._republish = republish  # the controller's: serialized with its own writes and publishes
        self.on_reported = on_reported  # the fleet burst budget's grants (burst_grants.py)
        self.reports = StoredReports()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self.reports.clear()  # another leader may have written since this replica last led
        self._thread = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.bus.inbox.put(Inbound("$stop", b""))
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.flush_seen()
        except Exception:
            log.exception("could not write the last-seen times of unchanged reports")

    def _run(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            try:
                if self.reports.due():
                    self.flush_seen()
                first = self.bus.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            except Exception:
                log.exception("could not write the last-seen times of unchanged reports")
                self.count("ingest_error")
                time.sleep(0.5)
                continue
            batch = [first]
            until = time.monotonic() + COALESCE_S
            while len(batch) < BATCH and batch[-1].topic != "$stop":
                try:
                    batch.append(self.bus.inbox.get(timeout=max(0.0, until - time.monotonic())))
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
        keys: dict[str, bytes] = {}  # device -> the key of its report in this batch
        now = time.time()
        for item in batch:
            if item.topic == CONNECTED:
                self.republish()
                continue
            if item.topic.startswith("$") or not item.payload:
                continue  # control markers, and retained messages being cleared
            try:
                link = parse_site_bridge(item.topic, item.payload)
                if link is not None:
                    # In order: what devices said before their site's link fell is stored first.
                    observations = self._site_link(*link, observations, keys)
                    continue
                device_id, kind = parse_topic(item.topic)
                if kind == "reported":
                    obj = load_json(item.payload)
                    key = report_key(obj)
                    # A retained replay is always stored: it comes once, when this leader subscribes.
                    same = None if item.retained or device_id in keys else self.reports.same(device_id, key)
                    if same is not None:
                        self.reports.seen(device_id, now)
                        state = same.observation.state
                    else:
                        state = from_json(obj, mqtt_pb2.ReportedState)
                        # Seen now, by our clock (a device's clock may be days off); a retained replay
                        # was sent earlier, and only the device's own timestamp says when.
                        seen = now
                        if item.retained and state.HasField("reported_at"):
                            seen = min(now, state.reported_at.ToNanoseconds() / 1e9)
                        observations.append(Reported(device_id, state, seen))
                        keys[device_id] = key
                    if self.on_reported is not None:
                        self.on_reported(device_id, state)
                elif kind == "status":
                    status = decode(item.payload, mqtt_pb2.DeviceStatus)
                    observations.append(Status(device_id, status.online, now))
                elif kind == "events" and _logged(peek(item.payload, "kind")):
                    self._event(device_id, decode(item.payload, mqtt_pb2.DeviceEvent))
                self.count(kind)
            except PayloadError as exc:
                self.count("bad_payload")
                log.warning(
                    "ignored a malformed MQTT message", extra={"topic": item.topic, "error": str(exc)}
                )
            except ControlPlaneError as exc:
                log.warning("ignored an MQTT message", extra={"topic": item.topic, "error": str(exc)})
        if observations:
            self._apply(observations, keys)

    def _apply(self, observations: list[Reported | Status], keys: dict[str, bytes]) -> None:
        """Store observations, remember the reports stored, wake the controller for what changed."""
        touched = self.fleet.apply(observations)
        for obs in observations:  # the batch's last report per device is the one stored
            if isinstance(obs, Reported) and obs.device_id in touched and obs.device_id in keys:
                self.reports.stored(keys[obs.device_id], obs)
        self.wake(touched)

    def flush_seen(self) -> None:
        """Write the pending last-seen times; a row that no longer holds its device's stored
        report gets that report written again, in full (it is the device's latest)."""
        pending = self.reports.take_seen()
        if not pending:
            return
        stale = self.fleet.touch(pending)
        again: list[Reported | Status] = []
        keys: dict[str, bytes] = {}
        for device_id in stale:
            stored = self.reports.forget(device_id)
            if stored is not None:
                again.append(Reported(device_id, stored.observation.state, pending[device_id][0]))
                keys[device_id] = stored.key
        if again:
            log.info("rewrote reports whose rows changed elsewhere", extra={"devices": len(again)})
            self._apply(again, keys)

    def _site_link(
        self, site: str, up: bool, pending: list[Reported | Status], keys: dict[str, bytes]
    ) -> list[Reported | Status]:
        """A site bridge's link changed: down, every device behind it is offline (their own
        will stays at the site broker); up, the bridge resends their retained statuses itself."""
        self.count("site_bridge")
        if up:
            log.info("site bridge connected", extra={"site": site})
            return pending
        if pending:
            self._apply(pending, keys)
        offline = self.fleet.site_offline(site)
        log.warning(
            "site bridge lost: its devices are offline", extra={"site": site, "devices": len(offline)}
        )
        self.wake(set(offline))
        return []

    def republish(self) -> None:
        count = self._republish()
        log.info("republished desired state", extra={"devices": count})

    @staticmethod
    def _event(device_id: str, event: mqtt_pb2.DeviceEvent) -> None:
        log.warning(
            "device event",
            extra={
                "device_id": device_id,
                "kind": mqtt_pb2.EventKind.Name(event.kind),
                "detail": event.message,
            },
        )
