"""The agent's MQTT v5 link: persistent session, Last Will, jittered reconnects, thin callbacks.

paho's network thread runs the callbacks; they only decode and hand messages to the owner's
queues (``on_desired``, ``on_chunk``), never block. Publishing is thread-safe in paho and
queues QoS 1 messages while the broker is away.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import Message
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgectl.addresses import AddressError, parse_mqtt_url
from edgectl.agent.errors import ConfigError
from edgectl.mqtt.wire import DeviceTopics, PayloadError, agent_client_id, decode, encode
from edgectl.protos.v1 import mqtt_pb2 as mpb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttSettings:
    """Where and how the agent connects."""

    url: str
    device_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 24 * 3600
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30


class MqttLink:
    """One device's connection to the broker."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_desired: Callable[[mpb.DesiredState], None],
        on_chunk: Callable[[mpb.ChunkData], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        on_log_request: Callable[[mpb.LogRequest], None] | None = None,
        on_grant: Callable[[mpb.BurstGrant | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = DeviceTopics(settings.device_id)
        self._on_desired = on_desired
        self._on_chunk = on_chunk
        self._on_connected = on_connected
        self._on_log_request = on_log_request
        self._on_grant = on_grant  # fleet burst budget grants (None: an empty one, no fleet budget)
        self.connected = threading.Event()
        try:
            url = parse_mqtt_url(settings.url)
        except AddressError as exc:
            raise ConfigError(f"broker {exc.args[0]}", hint=exc.hint) from exc
        self.host, self.port = url.host, url.port
        # A stable client id: the broker keeps our session (subscriptions, queued QoS 1) across drops.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=agent_client_id(settings.device_id),
            protocol=mqtt.MQTTv5,
        )
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if url.tls:
            self.client.tls_set(ca_certs=settings.ca_file)
        self.client.will_set(
            self.topics.status,
            encode(mpb.DeviceStatus(device_id=settings.device_id, online=False)),
            qos=1,
            retain=True,
        )
        self.client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        self.client.max_queued_messages_set(1000)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    def start(self) -> None:
        """Connect in the background; paho's loop reconnects for as long as the link lives."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self.client.connect_async(
            self.host, self.port, keepalive=self.settings.keepalive_s, clean_start=False, properties=props
        )
        self.client.loop_start()

    def stop(self) -> None:
        """Say offline (a clean disconnect does not fire the Will), then disconnect."""
        if self.connected.is_set():
            info = self.publish(
                self.topics.status,
                mpb.DeviceStatus(device_id=self.settings.device_id, online=False),
                retain=True,
            )
            if info is not None:
                info.wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def _handle_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        log.info("connected to %s:%d (session present: %s)", self.host, self.port, flags.session_present)
        client.subscribe(self.topics.desired, qos=1)
        client.subscribe(self.topics.chunk_data, qos=1)
        if self._on_log_request is not None:
            client.subscribe(self.topics.logs_request, qos=1)
        if self._on_grant is not None:
            client.subscribe(self.topics.burst_grant, qos=1)
        self.publish(
            self.topics.status, mpb.DeviceStatus(device_id=self.settings.device_id, online=True), retain=True
        )
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()
        # Jitter the next reconnect so a fleet that lost its broker does not return all at once.
        base = self.settings.reconnect_min_s
        client.reconnect_delay_set(random.randint(base, 2 * base), self.settings.reconnect_max_s)
        log.info("disconnected from broker (%s); reconnecting", reason)

    def _handle_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.desired:
                if not msg.payload:
                    return  # a cleared retained message
                desired = decode(bytes(msg.payload), mpb.DesiredState)
                if desired.device_id and desired.device_id != self.settings.device_id:
                    log.warning("ignoring desired state addressed to %s", desired.device_id)
                    return
                self._on_desired(desired)
            elif msg.topic == self.topics.chunk_data and self._on_chunk is not None:
                self._on_chunk(decode(bytes(msg.payload), mpb.ChunkData))
            elif msg.topic == self.topics.logs_request and self._on_log_request is not None and msg.payload:
                self._on_log_request(decode(bytes(msg.payload), mpb.LogRequest))
            elif msg.topic == self.topics.burst_grant and self._on_grant is not None:
                grant = decode(bytes(msg.payload), mpb.BurstGrant) if msg.payload else None
                if grant is not None and grant.device_id and grant.device_id != self.settings.device_id:
                    log.warning("ignoring a burst grant addressed to %s", grant.device_id)
                    return
                self._on_grant(grant)  # a lock and a few assignments: fine on paho's thread
        except PayloadError as exc:
            log.warning("ignoring malformed payload on %s: %s", msg.topic, exc)
        except Exception:  # a bug in a handler must never kill paho's network thread
            log.exception("error handling a message on %s", msg.topic)

    def publish(self, topic: str, message: Message, *, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish a protobuf message as proto3 JSON, QoS 1; never raises on a lost connection."""
        try:
            return self.client.publish(topic, encode(message), qos=1, retain=retain)
        except (ValueError, RuntimeError) as exc:
            log.warning("publish to %s failed: %s", topic, exc)
            return None

    def request_chunks(self, request: mpb.ChunkRequest) -> None:
        self.publish(self.topics.chunk_requests, request)
