"""Remote diagnostics: ask one agent for its recent log lines over MQTT request/response.

The request goes to the device's own ``logs/request`` topic (the broker lets only the control
plane publish there); the answer comes back on its ``logs/response``, which every replica
subscribes to, matched by a random request id. Only the device the topic names can publish an
answer there, and the answer must name that device. Answers are bounded and redacted again here.
"""

from __future__ import annotations

import json
import threading
import uuid

from edgectl.control_plane.bus import FleetBus
from edgectl.control_plane.errors import InvalidArgument, Unavailable
from edgectl.control_plane.fleet import Fleet
from edgectl.mqtt.wire import DeviceTopics, PayloadError, decode, encode, parse_topic
from edgectl.protos.v1 import fleet_pb2, mqtt_pb2
from edgectl.redact import redact, redact_settings

DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 30.0
MAX_LINES = 1000
MAX_BYTES = 256 * 1024  # what one answer may carry to the caller, whatever the agent sent
MAX_BUNDLE_BYTES = 96 * 1024  # a support bundle's JSON (config, versions, doctor), beside the lines
MAX_PENDING = 64  # requests waiting for an answer at once, on this replica


class _Waiter:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.done = threading.Event()
        self.answer: mqtt_pb2.LogResponse | None = None


class DeviceLogs:
    """Sends log requests and matches the answers; :meth:`on_message` is the bus's hook for answers."""

    def __init__(self, bus: FleetBus, fleet: Fleet) -> None:
        self.bus = bus
        self.fleet = fleet
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiter] = {}

    def on_message(self, topic: str, payload: bytes) -> None:
        """An answer arrived (paho's thread: decode, hand over, never block)."""
        try:
            device_id, _kind = parse_topic(topic)
            answer = decode(payload, mqtt_pb2.LogResponse)
        except PayloadError:
            return
        with self._lock:
            waiter = self._waiting.get(answer.request_id)
        # Only the device we asked, publishing on its own topic, can answer a request.
        if waiter is None or waiter.device_id != device_id or answer.device_id != device_id:
            return
        waiter.answer = answer
        waiter.done.set()

    def fetch(
        self, device_id: str, since_unix: float, max_lines: int, timeout_s: float, bundle: bool = False
    ) -> fleet_pb2.DeviceLogsResponse:
        """The device's lines at or after ``since_unix`` (newest ``max_lines``); Unavailable if it does not answer.

        ``bundle``: its support bundle too (``bundle_json``), checked, bounded and redacted here again."""
        if max_lines < 0 or since_unix < 0 or timeout_s < 0:
            raise InvalidArgument("since, max lines and timeout must not be negative")
        self.fleet.get(device_id)  # NotFound for a device that is not in the inventory
        if not self.bus.connected:
            raise Unavailable(
                "the control plane is not connected to the broker", hint="retry in a few seconds"
            )
        timeout = min(timeout_s or DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S)
        request = mqtt_pb2.LogRequest(request_id=uuid.uuid4().hex, since_unix=since_unix,
                                      max_lines=min(max_lines or MAX_LINES, MAX_LINES), max_bytes=MAX_BYTES,
                                      bundle=bundle)  # fmt: skip
        waiter = _Waiter(device_id)
        with self._lock:
            if len(self._waiting) >= MAX_PENDING:
                raise Unavailable("too many log requests in flight", hint="retry in a few seconds")
            self._waiting[request.request_id] = waiter
        try:
            self.bus.publish(DeviceTopics(device_id).logs_request, encode(request), qos=1)
            if not waiter.done.wait(timeout) or waiter.answer is None:
                raise Unavailable(
                    f"device {device_id} did not answer within {timeout:.0f}s",
                    hint="is it online and running an agent that keeps logs? see `edgectl devices ls`",
                )
        finally:
            with self._lock:
                self._waiting.pop(request.request_id, None)
        out = self._bounded(waiter.answer, request.max_lines)
        if bundle:
            out.bundle_json = _checked_bundle(device_id, waiter.answer.bundle_json)
        return out

    @staticmethod
    def _bounded(answer: mqtt_pb2.LogResponse, max_lines: int) -> fleet_pb2.DeviceLogsResponse:
        out = fleet_pb2.DeviceLogsResponse(truncated=answer.truncated)
        used = 0
        lines = list(answer.lines)[-max_lines:]
        kept: list[fleet_pb2.LogLine] = []
        for line in reversed(lines):
            text = redact(line.text)[:4096]
            used += len(text) + len(line.logger) + 16
            if used > MAX_BYTES:
                out.truncated = True
                break
            kept.append(
                fleet_pb2.LogLine(at=line.at, level=line.level[:16], logger=line.logger[:128], text=text)
            )
        out.truncated = out.truncated or len(lines) < len(answer.lines)
        out.lines.extend(reversed(kept))
        return out


def _checked_bundle(device_id: str, text: str) -> str:
    """The device's bundle as a JSON object, secrets dropped again: a device's word is not trusted."""
    if not text:
        raise Unavailable(
            f"device {device_id} answered without a support bundle",
            hint="its agent predates `devices bundle`: upgrade it, or use `edgectl devices logs`",
        )
    if len(text) > MAX_BUNDLE_BYTES:
        return json.dumps(
            {"error": f"the device's bundle was over {MAX_BUNDLE_BYTES} bytes and was left out"}
        )
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return json.dumps({"error": "the device's bundle was not a JSON object and was left out"})
    return json.dumps(redact_settings(parsed), sort_keys=True)
