"""The control plane's MQTT connection: retained desired state out, device reports in.

paho-mqtt 2.x, MQTT v5, callback API 2. Callbacks only enqueue: the owner's ingest thread
decodes and stores. paho's network thread reconnects with backoff by itself; every
(re)connect re-subscribes and tells the owner, who republishes the stored desired state.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgectl.addresses import parse_mqtt_url
from edgectl.control_plane.desired import Publication
from edgectl.logs import name_os_thread
from edgectl.mqtt.wire import (
    ALL_CHUNK_REQUESTS,
    ALL_EVENTS,
    ALL_LOG_RESPONSES,
    ALL_REPORTED,
    ALL_SITE_BRIDGES,
    ALL_STATUS,
    SHARED_CHUNK_REQUESTS,
    DeviceTopics,
)

log = logging.getLogger(__name__)
# Site bridges last: their retained "0" must arrive after the stale retained statuses it overrides.
# Chunk requests are not here: every replica takes them through a shared subscription.
FLEET_SUBSCRIPTIONS = [(ALL_REPORTED, 1), (ALL_STATUS, 1), (ALL_SITE_BRIDGES, 1)]
# Events only when asked (--device-events), at QoS 0: the leader just logs failures (reports carry
# what it decides on), so a lost one costs a log line, and the busiest topic of a rollout wants no PUBACK.
EVENTS_SUBSCRIPTION = (ALL_EVENTS, 0)
CONNECTED = "$connected"  # an inbox marker, never a real topic (MQTT topics cannot start with '$' here)


@dataclass(frozen=True)
class Inbound:
    """A message for the owner's loop (or the CONNECTED marker)."""

    topic: str
    payload: bytes
    retained: bool = False  # replayed by the broker on subscribe: stored earlier, not sent just now


class FleetBus:
    """One paho client; publishes are thread-safe, received messages land in ``inbox``."""

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        on_error: Callable[[str], None] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        device_events: bool = False,
    ) -> None:
        self.url = parse_mqtt_url(url)
        self.device_events = device_events
        self.inbox: queue.SimpleQueue[Inbound] = (
            queue.SimpleQueue()
        )  # paho's thread puts, without locks in Python
        self._subscriptions: list[tuple[str, int]] = []
        self._chunk_sink: Callable[[str, bytes], None] | None = None
        self._shared_mid: int | None = None
        self._shared_refused = False  # a broker without the shared subscription's ACL: the leader answers
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._on_error = on_error or (lambda kind: None)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgectl-cp-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        if self.url.username or username:
            self.client.username_pw_set(self.url.username or username, self.url.password or password)
        if self.url.tls:
            self.client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        # Thousands of retained desired states go out at once on start; do not throttle them to 20.
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        # Every replica (not only the leader) hears log answers: the one that asked is waiting.
        self.on_log_response: Callable[[str, bytes], None] | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until ``stop``."""
        self.client.connect_async(self.url.host, self.url.port, keepalive=30, clean_start=True)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    def serve_chunk_requests(self, sink: Callable[[str, bytes], None]) -> None:
        """Hand chunk requests to ``sink`` (topic, payload) on every replica, leading or not."""
        self._chunk_sink = sink
        if self.connected:
            self._subscribe_shared(self.client)

    def _subscribe_shared(self, client: Any) -> None:
        if self._chunk_sink is not None and not self._shared_refused:
            self._shared_mid = client.subscribe(SHARED_CHUNK_REQUESTS, qos=1)[1]

    def _fleet_subscriptions(self) -> list[tuple[str, int]]:
        chunks = [(ALL_CHUNK_REQUESTS, 1)] if self._shared_refused or self._chunk_sink is None else []
        events = [EVENTS_SUBSCRIPTION] if self.device_events else []
        return [*FLEET_SUBSCRIPTIONS[:-1], *events, *chunks, FLEET_SUBSCRIPTIONS[-1]]

    def subscribe_fleet(self) -> None:
        """Receive every device's reports and status, and events when asked (the leader's job)."""
        with self._lock:
            self._subscriptions = self._fleet_subscriptions()
        if self.connected:
            self.client.subscribe(self._subscriptions)
            self.inbox.put(Inbound(CONNECTED, b""))

    def unsubscribe_fleet(self) -> None:
        with self._lock:
            topics = [t for t, _ in self._subscriptions]
            self._subscriptions = []
        if topics and self.connected:
            self.client.unsubscribe(topics)

    # -- callbacks: enqueue only --------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused", extra={"reason": str(reason)})
            self._on_error("connect_refused")
            return
        name_os_thread("mqtt-network")  # paho's thread (for per-thread CPU: top -H)
        self._connected.set()
        self._subscribe_shared(client)
        with self._lock:
            subscriptions = list(self._subscriptions)
        client.subscribe(ALL_LOG_RESPONSES, qos=1)
        if subscriptions:
            client.subscribe(subscriptions)
            self.inbox.put(Inbound(CONNECTED, b""))
        log.info("MQTT connected", extra={"broker": f"{self.url.host}:{self.url.port}"})

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            log.warning("MQTT connection lost; reconnecting", extra={"reason": str(reason)})
            self._on_error("disconnect")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any) -> None:
        if mid != self._shared_mid or not any(r.is_failure for r in reasons):
            return
        # An older broker config lacks the ACL for the shared subscription: fall back to the leader
        # answering (as before), and say what to add.
        log.warning(
            "the broker refused the shared chunk-request subscription; only the leader answers chunk "
            "requests", extra={"subscription": SHARED_CHUNK_REQUESTS, "hint": "grant the control plane's "
            "role subscribePattern on it (new `edgectl broker config` files have it)"},
        )  # fmt: skip
        self._shared_refused = True
        with self._lock:
            leading = bool(self._subscriptions)
            if leading:
                self._subscriptions = self._fleet_subscriptions()
        if leading:
            client.subscribe(ALL_CHUNK_REQUESTS, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        sink = self._chunk_sink
        if sink is not None and msg.topic.endswith("/chunks/request"):
            sink(msg.topic, bytes(msg.payload))  # any replica answers; the leader's loop is not needed
            return
        if msg.topic.endswith("/logs/response"):
            if self.on_log_response is not None and msg.payload:
                self.on_log_response(msg.topic, bytes(msg.payload))
            return
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain)))

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue one message; paho sends it (and, at QoS 1, resends it after a reconnect).

        The returned info lets a sender of many large messages wait for each (the chunk server).
        """
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.PayloadFormatIndicator = 1 if payload else 0
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._on_error("publish")
            log.warning("MQTT publish failed", extra={"topic": topic, "rc": info.rc})
        return info

    def publish_desired(self, publications: list[Publication]) -> None:
        for p in publications:
            self.publish(p.topic, p.payload, qos=1, retain=True)

    def clear_device(self, device_id: str) -> None:
        """Delete a decommissioned device's retained messages (an empty retained payload removes one)."""
        topics = DeviceTopics(device_id)
        for topic in (topics.desired, topics.reported, topics.status):
            self.publish(topic, b"", qos=1, retain=True)
