"""Topics and the proto3-JSON codec that the control plane and agents share."""

from __future__ import annotations

import pytest

from edgectl.mqtt.wire import (
    MAX_PAYLOAD_BYTES,
    DeviceIdError,
    DeviceTopics,
    PayloadError,
    decode,
    encode,
    from_json,
    load_json,
    parse_topic,
    peek,
)
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


ODD = [
    b"[" * 100_000,  # json raises RecursionError here, not ValueError
    b'{"kind": ' * 50_000,
    b'{"deviceId": "d1", "deviceId": "d2"}',  # which one? neither: refused
    b'{"models": [{"name": "a", "name": "b"}]}',
    "{}".encode("utf-16"),  # json.loads takes UTF-16 bytes; proto3 JSON is UTF-8
    b"[1,2]",
    b"null",
    b'"text"',
    b"not json",
    b"\xff\xfe",
    b" " * (MAX_PAYLOAD_BYTES + 1),
]


@pytest.mark.parametrize("payload", ODD, ids=range(len(ODD)))
def test_decode_is_load_json_then_from_json(payload: bytes) -> None:
    """One parser: decode and the ingest's load_json + from_json accept and refuse alike (decode
    used protobuf's own JSON parser, which refused duplicate keys that load_json let through,
    and load_json let a RecursionError out where decode said PayloadError)."""
    with pytest.raises(PayloadError) as by_decode:
        decode(payload, mqtt_pb2.DesiredState)
    with pytest.raises(PayloadError) as by_parts:
        from_json(load_json(payload, "edgectl.v1.DesiredState"), mqtt_pb2.DesiredState)
    assert str(by_decode.value) == str(by_parts.value)
    with pytest.raises(PayloadError):
        peek(payload, "kind")  # the same JSON checks; only the fields' types are decode's alone
    for good in (b'{"deviceId": "d1", "generation": "7"}', b'{"deviceId": "d1", "from": {"a": [1]}}'):
        assert decode(good, mqtt_pb2.DesiredState) == from_json(load_json(good), mqtt_pb2.DesiredState)


def test_the_refusals_say_what_was_expected_and_what_came() -> None:
    def refusal(payload: bytes) -> str:
        with pytest.raises(PayloadError) as err:
            decode(payload, mqtt_pb2.DesiredState)
        return str(err.value)

    assert refusal(b"[1,2]") == (
        "not a edgectl.v1.DesiredState payload: the payload is an array, where a JSON object belongs"
    )
    assert refusal(b"null").endswith("the payload is null, where a JSON object belongs")
    assert "key 'deviceId' appears twice" in refusal(b'{"deviceId": "a", "deviceId": "b"}')
    assert "not UTF-8" in refusal("{}".encode("utf-16"))
    assert "not JSON" in refusal(b"[" * 100_000)
    assert "Failed to parse generation field" in refusal(b'{"generation": "x"}')
    assert (
        refusal(b" " * (MAX_PAYLOAD_BYTES + 1))
        == f"payload of {MAX_PAYLOAD_BYTES + 1} bytes exceeds {MAX_PAYLOAD_BYTES}"
    )
