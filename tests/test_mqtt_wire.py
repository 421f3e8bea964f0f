"""Topics and the proto3-JSON codec that the control plane and agents share."""

from __future__ import annotations

import pytest

from edgectl.mqtt.wire import DeviceIdError, DeviceTopics, PayloadError, decode, encode, parse_topic, peek
from edgectl.protos.v1 import mqtt_pb2


def test_topics_of_a_device() -> None:
    t = DeviceTopics("cam-07")
    assert t.desired == "edgectl/v1/devices/cam-07/desired"
    assert t.subtree == "edgectl/v1/devices/cam-07/#"
    assert parse_topic(t.chunk_requests) == ("cam-07", "chunks/request")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+", "../x", "-lead", "x" * 129, "a b"])
def test_device_ids_that_could_escape_their_subtree_are_refused(bad: str) -> None:
    with pytest.raises(DeviceIdError):
        DeviceTopics(bad)


def test_roundtrip_and_readable_json() -> None:
    msg = mqtt_pb2.DesiredState(
        device_id="d1", generation=7, models=[mqtt_pb2.DesiredModel(name="m", digest="sha256:00", version=2)]
    )
    payload = encode(msg)
    assert b'"deviceId":"d1"' in payload.replace(b" ", b"")
    assert decode(payload, mqtt_pb2.DesiredState) == msg


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"not json", b'{"generation": "x"}', b"[1,2]"])
def test_malformed_payloads_are_one_named_error(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(payload, mqtt_pb2.DesiredState)


def test_unknown_fields_from_newer_peers_are_ignored() -> None:
    got = decode(b'{"deviceId": "d", "fromTheFuture": 1}', mqtt_pb2.DesiredState)
    assert got.device_id == "d"


def test_topic_outside_the_tree_is_refused() -> None:
    with pytest.raises(PayloadError):
        parse_topic("other/v1/devices/x/desired")


def test_peek_reads_one_field_as_the_full_decode_would() -> None:
    event = mqtt_pb2.DeviceEvent(device_id="d", kind=mqtt_pb2.EVENT_KIND_FAILED, message="no space")
    assert peek(encode(event), "kind") == "EVENT_KIND_FAILED"
    assert peek(encode(event), "bytesDone") is None  # proto3 JSON leaves defaults out
    assert peek(b'{"kind": 7}', "kind") == 7  # a peer may number an enum


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"not json", b"[1,2]", b"3", b"x" * (4 * 1024 * 1024 + 1)])
def test_peek_refuses_what_is_no_json_object(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        peek(payload, "kind")
