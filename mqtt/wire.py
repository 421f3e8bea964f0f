"""The MQTT side of the contract: topic names and the proto3-JSON payload codec.

The control plane and agents meet only here and in protos/: both build topics with these
functions and encode payloads with :func:`encode`, so ``mosquitto_sub -v -t 'edgectl/#'``
stays readable and a malformed payload is one :class:`PayloadError`, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from edgectl.errors import EdgectlError

TOPIC_ROOT = "edgectl/v1/devices"
# A site broker's bridge announces itself here on the central broker: "1" when its link is up,
# "0" (its will) when the link to the site is lost, so the devices behind it are offline too.
SITES_ROOT = "edgectl/v1/sites"
SITE_LABEL = "site"  # the label naming the site broker a device is behind
# MQTT wildcards and separators would let one device id address another's subtree.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
AGENT_CLIENT_ID_PREFIX = "edgectl-agent-"

M = TypeVar("M", bound=Message)


class PayloadError(EdgectlError):
    """An MQTT payload that is not the message its topic promises."""


class DeviceIdError(EdgectlError):
    """A device id that cannot be used as an MQTT topic level."""


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged, or raise when it could escape its topic subtree."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise DeviceIdError(
            f"invalid device id {device_id!r}",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return device_id


def agent_client_id(device_id: str) -> str:
    """The MQTT client id an agent connects with; the broker pins each device's login to it."""
    return AGENT_CLIENT_ID_PREFIX + check_device_id(device_id)


@dataclass(frozen=True)
class DeviceTopics:
    """Every topic of one device's subtree: ``edgectl/v1/devices/{id}/...``."""

    device_id: str

    def __post_init__(self) -> None:
        check_device_id(self.device_id)

    @property
    def root(self) -> str:
        return f"{TOPIC_ROOT}/{self.device_id}"

    @property
    def desired(self) -> str:
        return f"{self.root}/desired"

    @property
    def reported(self) -> str:
        return f"{self.root}/reported"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def chunk_requests(self) -> str:
        return f"{self.root}/chunks/request"

    @property
    def chunk_data(self) -> str:
        return f"{self.root}/chunks/data"

    @property
    def logs_request(self) -> str:
        return f"{self.root}/logs/request"

    @property
    def logs_response(self) -> str:
        return f"{self.root}/logs/response"

    @property
    def burst_grant(self) -> str:
        return f"{self.root}/burst/grant"

    @property
    def subtree(self) -> str:
        return f"{self.root}/#"


# What the control plane subscribes to, for every device at once.
ALL_REPORTED = f"{TOPIC_ROOT}/+/reported"
ALL_STATUS = f"{TOPIC_ROOT}/+/status"
ALL_EVENTS = f"{TOPIC_ROOT}/+/events"
ALL_CHUNK_REQUESTS = f"{TOPIC_ROOT}/+/chunks/request"
ALL_LOG_RESPONSES = f"{TOPIC_ROOT}/+/logs/response"
# Every control-plane replica subscribes here; the broker hands each request to one live member,
# so artifact chunks over MQTT do not wait for a leader.
CHUNK_SHARE_GROUP = "edgectl-chunks"
SHARED_CHUNK_REQUESTS = f"$share/{CHUNK_SHARE_GROUP}/{ALL_CHUNK_REQUESTS}"
ALL_SITE_BRIDGES = f"{SITES_ROOT}/+/bridge"
# Which way each of a device's topics crosses a site bridge.
DEVICE_TO_CENTER = ("reported", "status", "events", "chunks/request", "logs/response")
CENTER_TO_DEVICE = ("desired", "chunks/data", "logs/request", "burst/grant")


def site_bridge_topic(site: str) -> str:
    """Where the bridge of ``site`` reports its link: ``edgectl/v1/sites/{site}/bridge``."""
    return f"{SITES_ROOT}/{check_device_id(site)}/bridge"


def parse_site_bridge(topic: str, payload: bytes) -> tuple[str, bool] | None:
    """``(site, link up)`` for a bridge notification, None for any other topic."""
    head, sep, rest = topic.partition(SITES_ROOT + "/")
    site, _, kind = rest.partition("/")
    if head or not sep or kind != "bridge":
        return None
    if payload not in (b"0", b"1"):
        raise PayloadError(f"bridge notification on {topic!r} is {payload[:16]!r}, not 0 or 1")
    return check_device_id(site), payload == b"1"


def parse_topic(topic: str) -> tuple[str, str]:
    """Split ``edgectl/v1/devices/{id}/{kind...}`` into ``(device_id, kind)``."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise PayloadError(f"topic {topic!r} is outside {TOPIC_ROOT}/")
    device_id, sep, kind = topic[len(prefix) :].partition("/")
    if not sep or not kind:
        raise PayloadError(f"topic {topic!r} names no message kind")
    return check_device_id(device_id), kind


def encode(message: Message) -> bytes:
    """Proto3 JSON, compact, with stable field order."""
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def decode(payload: bytes, message_type: type[M]) -> M:
    """Parse a proto3-JSON payload (:func:`load_json`, then :func:`from_json`: one parser for
    every reader); unknown fields are ignored so newer peers interoperate."""
    return from_json(load_json(payload, message_type.DESCRIPTOR.full_name), message_type)


def peek(payload: bytes, json_name: str) -> Any:
    """One top-level field of a proto3-JSON payload (its JSON name; None when absent), read without
    building the message: for a reader that acts on few messages of a busy topic, e.g. on an
    event's ``kind``, and decodes only those."""
    return load_json(payload).get(json_name)


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key given twice means one thing to this parser and maybe another to the next reader
    # (protobuf's own JSON parser refuses it too): refused, not "the last one wins".
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def load_json(payload: bytes, expected: str = "") -> dict[str, Any]:
    """A payload's JSON object, not yet a message (json's C parser, a few us: cheap next to
    :func:`from_json`); ``expected`` names the message the payload should hold, for the error."""
    what = f"a {expected} payload" if expected else "a proto3-JSON payload"
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        # UTF-8 only, as proto3 JSON is: json.loads would also take UTF-16 and UTF-32 bytes.
        obj = json.loads(payload.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise PayloadError(f"not {what}: not UTF-8 ({exc})") from exc
    except _DuplicateKeyError as exc:
        raise PayloadError(f"not {what}: key {str(exc)!r} appears twice in one object") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than json parses
        raise PayloadError(f"not {what}: not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        kind = "null" if obj is None else _JSON_KINDS.get(type(obj), type(obj).__name__)
        raise PayloadError(f"not {what}: the payload is {kind}, where a JSON object belongs")
    return obj


def from_json(obj: dict[str, Any], message_type: type[M]) -> M:
    """The message a :func:`load_json` object holds; unknown fields are ignored, as :func:`decode` does."""
    message = message_type()
    try:
        json_format.ParseDict(obj, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise PayloadError(f"not a {message_type.DESCRIPTOR.full_name} payload: {exc}") from exc
    return message
