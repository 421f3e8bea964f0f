"""Floods of malformed MQTT payloads and malformed gRPC requests at the control plane and the agents."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edgectl.agent.codecs import encode_request
from edgectl.artifact import TrustStore
from edgectl.mqtt.wire import DeviceTopics
from edgectl.protos.inference import grpc_predict_v2_pb2 as v2
from edgectl.protos.v1 import artifacts_pb2, common_pb2, fleet_pb2, rollouts_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.sim import AgentHost, issue_tokens, make_devices
from tests.agent.conftest import V2Client
from tests.agent.onnx_models import run_direct
from tests.faults.conftest import LABELS, MODEL, Artifacts, assert_fleet_verified, deploy
from tests.harness.fleet import FleetRig
from tests.harness.mqtt import MqttTestClient

# A malformed request may be refused with any of these; UNKNOWN means a servicer raised
# something it does not handle, and that is the bug this test exists to find.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
}  # fmt: skip
# grpc itself answers INTERNAL ("Exception deserializing request") to bytes that are not the message.
RAW_REFUSALS = REFUSALS | {grpc.StatusCode.INTERNAL}
CP_SERVICES = [
    artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"],
    fleet_pb2.DESCRIPTOR.services_by_name["FleetService"],
    rollouts_pb2.DESCRIPTOR.services_by_name["RolloutService"],
    rollouts_pb2.DESCRIPTOR.services_by_name["AuditService"],
]
V2_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MUTATING = {"Delete", "DecommissionDevice", "Abort", "Rollback", "Pause", "Create"}


def junk_payloads(rng: random.Random) -> list[bytes]:
    return [
        b"", b"{", b"[]", b"null", b'"text"', b"\x00\xff" * 64, bytes(rng.getrandbits(8) for _ in range(512)),
        b'{"generation": "many"}', b'{"models": "x"}', b'{"models": [{"digest": 5}]}', b'{"a":' * 5000,
        "\u00e9".encode("latin-1"), b'{"device_id": ' + b"9" * 400 + b"}", b'{"chunkDigests": [1, 2]}',
        bytes(rng.getrandbits(8) for _ in range(256 * 1024)),
    ]  # fmt: skip


def flood_mqtt(rig: FleetRig, device_ids: list[str], rounds: int = 4) -> int:
    """Publish junk on every topic of the devices' subtrees and of ids that do not exist."""
    rng = random.Random(7)
    client = MqttTestClient(rig.broker.host, rig.broker.port)
    client.connect()
    sent = 0
    try:
        for _ in range(rounds):
            for device_id in [*device_ids, "ghost-1", "x"]:
                t = DeviceTopics(device_id)
                for topic in (t.desired, t.chunk_data, t.reported, t.status, t.events, t.chunk_requests):
                    for payload in junk_payloads(rng):
                        # Retained junk on the agents' own topics too: the next report replaces it.
                        retain = topic in (t.reported, t.status) and rng.random() < 0.3
                        client.client.publish(topic, payload, qos=1, retain=retain)
                        sent += 1
        client.publish(DeviceTopics("ghost-1").status, b"", retain=True)  # waits for the queue to drain
    finally:
        client.close()
    return sent


def _call(
    channel: grpc.Channel, path: str, streaming_in: bool, streaming_out: bool, data: bytes
) -> grpc.StatusCode:
    ident = {"request_serializer": None, "response_deserializer": None}
    try:
        if streaming_in:
            channel.stream_unary(path, **ident)(iter([data, data[::-1]]), timeout=10)
        elif streaming_out:
            for _ in channel.unary_stream(path, **ident)(data, timeout=10):
                pass
        else:
            channel.unary_unary(path, **ident)(data, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def flood_grpc(address: str, services: list, rounds: int) -> Counter[tuple[str, grpc.StatusCode]]:
    """Random bytes at every method; a method that answers OK to junk parsed it as an empty request."""
    rng = random.Random(11)
    codes: Counter[tuple[str, grpc.StatusCode]] = Counter()
    with grpc.insecure_channel(address) as channel:
        for service in services:
            for m in service.methods:
                if m.name in MUTATING:
                    continue  # junk that happens to parse could name a real object: not this test's point
                for _ in range(rounds):
                    junk = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 100, 5000])))
                    path = f"/{service.full_name}/{m.name}"
                    codes[m.name, _call(channel, path, m.client_streaming, m.server_streaming, junk)] += 1
    return codes


def malformed_cp_requests(rig: FleetRig, digest: str) -> Iterator[tuple[str, grpc.StatusCode]]:
    """Well-formed messages with malformed contents, at the control plane's API."""
    c = rig.client
    zero = "sha256:" + "0" * 64
    calls = [
        ("Get bad digest", lambda: c.artifacts.Get(artifacts_pb2.GetArtifactRequest(artifact="sha256:zz"))),
        ("Get huge name", lambda: c.artifacts.Get(artifacts_pb2.GetArtifactRequest(artifact="x" * 100_000))),
        ("Download foreign chunks", lambda: list(c.artifacts.Download(
            artifacts_pb2.DownloadRequest(digest=digest, chunks=[zero] * 2000)))),
        ("Download path escape", lambda: list(c.artifacts.Download(
            artifacts_pb2.DownloadRequest(digest=digest, path="../../../etc/passwd", offset=-5)))),
        ("Download nothing", lambda: list(c.artifacts.Download(artifacts_pb2.DownloadRequest(digest=digest)))),
        ("Delete unknown", lambda: c.artifacts.Delete(artifacts_pb2.DeleteArtifactRequest(digest=zero))),
        ("Enroll bad id", lambda: c.fleet.Enroll(fleet_pb2.EnrollRequest(device_id="../evil/#", token="t"))),
        ("Enroll bad token", lambda: c.fleet.Enroll(fleet_pb2.EnrollRequest(device_id="flood-0", token="nope"))),
        ("Token bad id", lambda: c.fleet.CreateEnrollmentToken(
            fleet_pb2.CreateEnrollmentTokenRequest(device_id="a/+/b"))),
        ("Label bad key", lambda: c.fleet.LabelDevice(
            fleet_pb2.LabelDeviceRequest(id="flood-00000", set={"id": "x", "a=b": "c,d"}))),
        ("Decommission unknown", lambda: c.fleet.DecommissionDevice(
            fleet_pb2.DecommissionDeviceRequest(id="never-seen-device"))),
        ("Create empty selector", lambda: c.rollouts.Create(RP.CreateRolloutRequest(artifact=f"{MODEL}:2"))),
        ("Create bad waves", lambda: c.rollouts.Create(RP.CreateRolloutRequest(
            artifact=f"{MODEL}:2", selector=common_pb2.Selector(match_labels=LABELS),
            strategy=RP.Strategy(waves=["0%", "-1", "abc"], health_timeout_seconds=-3)))),
        ("Create unknown artifact", lambda: c.rollouts.Create(RP.CreateRolloutRequest(
            artifact="nope:99", selector=common_pb2.Selector(match_labels=LABELS)))),
        ("Abort unknown", lambda: c.rollouts.Abort(RP.RolloutActionRequest(id="r-" + "9" * 5000))),
    ]  # fmt: skip
    for what, call in calls:
        try:
            call()
        except grpc.RpcError as exc:
            yield what, exc.code()
        else:
            yield what, grpc.StatusCode.OK


def malformed_infer_requests(address: str) -> Iterator[tuple[str, grpc.StatusCode]]:
    """Well-formed ModelInferRequests with malformed contents, at an agent's KServe V2 server."""
    x = np.ones((2, 64), np.float32)
    good = encode_request(MODEL, {"x": x})
    cases: dict[str, v2.ModelInferRequest] = {"unknown model": encode_request("nope", {"x": x})}
    for what, edit in {
        "wrong dtype": lambda r: setattr(r.inputs[0], "datatype", "INT8"),
        "shape vs bytes": lambda r: r.inputs[0].shape.__setitem__(0, 3),
        "huge shape": lambda r: r.inputs[0].shape.extend([10**12]),
        "negative shape": lambda r: r.inputs[0].shape.__setitem__(1, -64),
        "no contents": lambda r: r.ClearField("raw_input_contents"),
        "extra contents": lambda r: r.raw_input_contents.append(b"\x00" * 7),
        "unknown dtype": lambda r: setattr(r.inputs[0], "datatype", "COMPLEX128"),
        "wrong input name": lambda r: setattr(r.inputs[0], "name", "nope"),
    }.items():
        req = v2.ModelInferRequest()
        req.CopyFrom(good)
        edit(req)
        cases[what] = req
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            f"/{V2_SERVICE.full_name}/ModelInfer",
            request_serializer=v2.ModelInferRequest.SerializeToString,
            response_deserializer=v2.ModelInferResponse.FromString,
        )
        for what, req in cases.items():
            try:
                infer(req, timeout=10)
            except grpc.RpcError as exc:
                yield what, exc.code()
            else:
                yield what, grpc.StatusCode.OK


@pytest.fixture
def host(rig: FleetRig) -> Iterator[AgentHost]:
    h = AgentHost(rig.settings(serve=True))
    yield h
    h.close()


def test_flood_of_malformed_mqtt_and_grpc_leaves_everything_up_and_correct(
    rig: FleetRig, host: AgentHost, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: junk on every MQTT topic of the fleet (the control plane's and the agents') and
    junk or malformed gRPC requests at every method of the control plane and of the agents' V2
    servers are refused one by one (a clear status code, never an unhandled error), crash nothing,
    and change nothing: afterwards a rollout still succeeds, every device serves the new model,
    verified, and answers inference with that model's exact outputs."""
    d1 = rig.push(artifacts.good(1))
    new = artifacts.good(2)
    d2 = rig.push(new)
    devices = issue_tokens(rig.cp.address, make_devices(2, "flood", LABELS))
    for d in devices:
        host.start(d)
    ids = [d.device_id for d in devices]
    rig.wait_all_online(ids)
    assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, host, trust, d1)

    assert flood_mqtt(rig, ids) > 300
    bad_cp = [(what, code) for what, code in malformed_cp_requests(rig, d1) if code not in REFUSALS]
    assert not bad_cp, f"the control plane mishandled malformed requests: {bad_cp}"
    raw_cp = [
        k
        for k in flood_grpc(rig.cp.address, CP_SERVICES, rounds=4)
        if k[1] not in RAW_REFUSALS | {grpc.StatusCode.OK}
    ]
    assert not raw_cp, f"the control plane mishandled junk bytes: {raw_cp}"
    for agent in host.agents.values():
        bad_v2 = [
            (what, code) for what, code in malformed_infer_requests(agent.address) if code not in REFUSALS
        ]
        assert not bad_v2, f"an agent mishandled malformed inference requests: {bad_v2}"
        raw_v2 = [
            k
            for k in flood_grpc(agent.address, [V2_SERVICE], rounds=4)
            if k[1] not in RAW_REFUSALS | {grpc.StatusCode.OK}
        ]
        assert not raw_v2, f"an agent mishandled junk bytes: {raw_v2}"

    assert rig.cp.proc is not None and rig.cp.proc.poll() is None, "the control plane died"
    assert all(t.is_alive() for a in host.agents.values() for t in a._threads), "an agent's loop died"
    assert deploy(rig, 2).state == RP.ROLLOUT_STATE_SUCCEEDED
    assert_fleet_verified(rig, host, trust, d2)
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    want = run_direct(new.root / "model.onnx", {"x": x})["y"]
    for agent in host.agents.values():
        client = V2Client(agent.address)
        y, served_by, version = client.infer(MODEL, x)
        client.close()
        assert (served_by, version) == ("local", "2")
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
