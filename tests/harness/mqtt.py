"""A small synchronous MQTT v5 test client over paho-mqtt 2.x, for asserting what a broker carries."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgectl.mqtt.wire import decode


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttTestClient:
    """Connects, subscribes and collects messages into a queue; blocking helpers with timeouts."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.suback: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._connected: queue.Queue[ReasonCode] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca)
        self.disconnected: queue.Queue[ReasonCode] = queue.Queue()
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.host, self.port = host, port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._connected.put(reason)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.disconnected.put(reason)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        self.suback.put(reasons)

    def connect(self, timeout: float = 5.0, clean_start: bool = True) -> ReasonCode:
        """Connect and return the CONNACK reason code (check ``.is_failure``).

        ``clean_start=False`` asks for the client id's stored session, as an agent does.
        """
        props = None
        if not clean_start:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        self.client.connect(self.host, self.port, keepalive=30, clean_start=clean_start, properties=props)
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)  # tests see each refusal once
        self.client.loop_start()
        return self._connected.get(timeout=timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[ReasonCode]:
        self.client.subscribe(topic, qos=qos)
        return self.suback.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=Properties(3))
        info.wait_for_publish(timeout=5.0)

    def nothing_arrives(self, within: float = 1.0) -> bool:
        """True when no message arrives for ``within`` seconds."""
        try:
            self.messages.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def expect(self, timeout: float = 5.0) -> Received:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drain_decoded(client: MqttTestClient, sinks: Mapping[str, tuple[type[Any], list[Any]]]) -> None:
    """Decode each message waiting on ``client`` whose topic is in ``sinks`` into that topic's list
    (as its message type); other topics, and empty payloads (a retained message cleared), are passed over."""
    while True:
        try:
            msg = client.messages.get_nowait()
        except queue.Empty:
            return
        sink = sinks.get(msg.topic)
        if sink is not None and msg.payload:
            sink[1].append(decode(msg.payload, sink[0]))
