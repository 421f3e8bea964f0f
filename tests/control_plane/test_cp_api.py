"""The gRPC API over a real server: artifacts, fleet, bad input, audit, health, reflection, metrics, MQTT chunks."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgectl.artifact import Artifact, SigningKey
from edgectl.client import ControlPlaneClient, push_artifact
from edgectl.control_plane.server import ControlPlane
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import artifacts_pb2 as AP
from edgectl.protos.v1 import common_pb2, fleet_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.control_plane.sim_device import SimFleet, wait_for
from tests.harness.mqtt import MqttTestClient


def state_of(cp: ControlPlane) -> dict[str, Any]:
    """Everything a bad request must leave untouched: the blob store and every table."""
    tables = ["artifacts", "upload_plans", "devices", "rollouts", "rollout_devices", "rollout_events",
              "enrollment_tokens"]  # fmt: skip
    with cp.store.tx() as tx:
        rows = {t: tx.all(f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    return {"blobs": sorted(cp.blobs.iter_digests()), **rows}


def settled_state(cp: ControlPlane, quiet_s: float = 0.5, timeout: float = 15.0) -> dict[str, Any]:
    """``state_of`` once devices stopped changing it: connected devices' first reports arrive
    after they register (the ingest gathers a batch for up to 50 ms), and the state a bad request
    must leave alone is the one after them."""
    deadline = time.monotonic() + timeout
    last = state_of(cp)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = state_of(cp)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the control plane's state kept changing for {timeout} s")


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def test_upload_list_get_download_delete(
    cp: ControlPlane, client: ControlPlaneClient, build: Callable[..., Artifact]
) -> None:
    art = build(version=3)
    result = push_artifact(client, art.root)
    assert result.artifact.ref.digest == art.digest and result.chunks_sent > 0
    again = push_artifact(client, art.root)
    assert again.already_present and again.chunks_sent == 0
    listed = client.artifacts.List(AP.ListArtifactsRequest()).artifacts
    assert [(a.ref.name, a.ref.version) for a in listed] == [("digits", 3)]
    got = client.artifacts.Get(AP.GetArtifactRequest(artifact="digits"))
    assert hashlib.sha256(got.manifest).hexdigest() == art.digest.removeprefix("sha256:")
    model = (art.root / "model.onnx").read_bytes()
    pieces = list(
        client.artifacts.Download(AP.DownloadRequest(digest=art.digest, path="model.onnx", offset=12345))
    )
    assert b"".join(p.data for p in pieces) == model[12345:]
    assert all(p.chunk_digest == "sha256:" + hashlib.sha256(p.data).hexdigest() for p in pieces)
    wanted = [c.digest for c in art.manifest.file("model.onnx").chunks][1:3]
    by_chunk = list(client.artifacts.Download(AP.DownloadRequest(digest=art.digest, chunks=wanted)))
    assert [p.chunk_digest for p in by_chunk] == wanted
    bad = rpc_error(
        lambda: list(
            client.artifacts.Download(AP.DownloadRequest(digest=art.digest, chunks=["sha256:" + "0" * 64]))
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    freed = client.artifacts.Delete(AP.DeleteArtifactRequest(digest=art.digest))
    assert (
        freed.bytes_freed == sum(f.size for f in art.manifest.files) and list(cp.blobs.iter_digests()) == []
    )
    assert rpc_error(lambda: client.artifacts.Get(AP.GetArtifactRequest(artifact=art.digest))).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def test_resumed_upload_sends_only_missing_chunks(
    client: ControlPlaneClient, build: Callable[..., Artifact]
) -> None:
    art = build(version=1, size=2_000_000)
    sig = (art.root / "manifest.sig.json").read_bytes()
    plan = client.artifacts.PlanUpload(AP.PlanUploadRequest(manifest=art.manifest_bytes, signatures=sig))
    chunks = {c.digest: (f.path, c) for f in art.manifest.files for c in f.chunks}
    first = plan.missing_chunks[0]
    path, ref = chunks[first]
    data = (art.root / path).read_bytes()[ref.offset : ref.offset + ref.size]

    def partial() -> Any:
        yield AP.UploadRequest(header=AP.UploadHeader(digest=plan.digest))
        yield AP.UploadRequest(chunk=AP.ChunkPayload(digest=first, data=data))

    # The stream ends early: nothing is committed, the received chunk is kept for the resume.
    err = rpc_error(lambda: client.artifacts.Upload(partial()))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "PlanUpload again" in err.details()
    again = client.artifacts.PlanUpload(AP.PlanUploadRequest(manifest=art.manifest_bytes, signatures=sig))
    assert list(again.missing_chunks) == list(plan.missing_chunks[1:])
    result = push_artifact(client, art.root)
    assert result.chunks_sent == len(plan.missing_chunks) - 1


def test_bad_uploads_are_refused_and_change_nothing(
    cp: ControlPlane, client: ControlPlaneClient, build: Callable[..., Artifact]
) -> None:
    before = state_of(cp)
    stranger = build(version=1, signing_key=SigningKey.generate())
    sig = (stranger.root / "manifest.sig.json").read_bytes()
    err = rpc_error(
        lambda: client.artifacts.PlanUpload(
            AP.PlanUploadRequest(manifest=stranger.manifest_bytes, signatures=sig)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not a trusted key" in err.details()
    assert "trust" in err.details()
    assert state_of(cp) == before

    art = build(version=2)
    sig = (art.root / "manifest.sig.json").read_bytes()
    err = rpc_error(
        lambda: client.artifacts.PlanUpload(
            AP.PlanUploadRequest(manifest=art.manifest_bytes + b" ", signatures=sig)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert state_of(cp) == before

    plan = client.artifacts.PlanUpload(AP.PlanUploadRequest(manifest=art.manifest_bytes, signatures=sig))
    planned = state_of(cp)

    def tampered() -> Any:
        yield AP.UploadRequest(header=AP.UploadHeader(digest=plan.digest))
        yield AP.UploadRequest(chunk=AP.ChunkPayload(digest=plan.missing_chunks[0], data=b"not the model"))

    err = rpc_error(lambda: client.artifacts.Upload(tampered()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hash to sha256:" in err.details() and "rebuild the artifact" in err.details()
    assert state_of(cp) == planned and client.artifacts.List(AP.ListArtifactsRequest()).artifacts == []


def test_bad_rollout_requests_say_what_to_fix_and_change_nothing(
    cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    push(build(version=1))
    sim.add("dev-1", {"site": "lab"})
    sim.add("dev-2", {"site": "lab"})
    sim.connect()
    wait_for(lambda: len(cp.fleet.list_devices()) == 2, 10, what="devices registered")
    before = settled_state(cp)
    lab = common_pb2.Selector(match_labels={"site": "lab"})
    cases = [
        (RP.CreateRolloutRequest(artifact="nosuch:4", selector=lab), grpc.StatusCode.NOT_FOUND, "artifact push"),
        (RP.CreateRolloutRequest(artifact="digits", selector=common_pb2.Selector()), grpc.StatusCode.INVALID_ARGUMENT,
         "select devices"),
        (RP.CreateRolloutRequest(artifact="digits", selector=lab, strategy=RP.Strategy(waves=["1", "ten%"])),
         grpc.StatusCode.INVALID_ARGUMENT, "e.g. --strategy 1,10%,50%,100%"),
        (RP.CreateRolloutRequest(artifact="digits", selector=lab, strategy=RP.Strategy(waves=["1"])),
         grpc.StatusCode.INVALID_ARGUMENT, "end the strategy with 100%"),
        (RP.CreateRolloutRequest(artifact="digits", selector=lab, strategy=RP.Strategy(max_failures="many")),
         grpc.StatusCode.INVALID_ARGUMENT, "e.g. 0, 2 or 5%"),
        (RP.CreateRolloutRequest(artifact="digits", selector=common_pb2.Selector(match_labels={"site": "mars"})),
         grpc.StatusCode.FAILED_PRECONDITION, "devices ls"),
    ]  # fmt: skip
    for request, code, hint in cases:
        err = rpc_error(lambda r=request: client.rollouts.Create(r))  # type: ignore[misc]
        assert err.code() == code, (request, err.details())
        assert hint in err.details(), err.details()
    assert state_of(cp) == before


def test_enrollment_over_grpc(cp: ControlPlane, client: ControlPlaneClient) -> None:
    token = client.fleet.CreateEnrollmentToken(
        fleet_pb2.CreateEnrollmentTokenRequest(device_id="cam-7", labels={"site": "lab"})
    )
    creds = client.fleet.Enroll(fleet_pb2.EnrollRequest(device_id="cam-7", token=token.token))
    assert creds.mqtt_username == "cam-7" and creds.mqtt_password and len(creds.trusted_keys) == 1
    assert b"PUBLIC KEY" in creds.trusted_keys[0]
    err = rpc_error(
        lambda: client.fleet.Enroll(fleet_pb2.EnrollRequest(device_id="cam-7", token=token.token))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    device = client.fleet.GetDevice(fleet_pb2.GetDeviceRequest(id="cam-7"))
    assert device.labels == {"site": "lab"} and not device.online
    labelled = client.fleet.LabelDevice(
        fleet_pb2.LabelDeviceRequest(id="cam-7", set={"ring": "canary"}, remove=["site"])
    )
    assert dict(labelled.labels) == {"ring": "canary"}
    client.fleet.DecommissionDevice(fleet_pb2.DecommissionDeviceRequest(id="cam-7"))
    err = rpc_error(lambda: client.fleet.GetDevice(fleet_pb2.GetDeviceRequest(id="cam-7")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    bad = rpc_error(
        lambda: client.fleet.CreateEnrollmentToken(fleet_pb2.CreateEnrollmentTokenRequest(device_id="a/#"))
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_live_state_and_delete_refused_while_referenced(
    cp: ControlPlane, client: ControlPlaneClient, sim: SimFleet, build: Callable[..., Artifact],
    push: Callable[[Artifact], str],
) -> None:  # fmt: skip
    digest = push(build(version=1))
    sim.add("dev-1", {"site": "lab"})
    sim.connect()
    wait_for(lambda: len(cp.fleet.list_devices()) == 1, 10, what="device registered")
    rollout = client.rollouts.Create(
        RP.CreateRolloutRequest(artifact="digits", selector=common_pb2.Selector(device_ids=["dev-1"]))
    )
    list(client.rollouts.Watch(RP.WatchRolloutRequest(id=rollout.id), timeout=30))
    device = client.fleet.GetDevice(fleet_pb2.GetDeviceRequest(id="dev-1"))
    assert device.online and device.active.digest == digest and device.desired.digest == digest
    assert device.labels == {"site": "lab"} and device.last_seen.seconds > 0
    err = rpc_error(lambda: client.artifacts.Delete(AP.DeleteArtifactRequest(digest=digest)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "device dev-1" in err.details()
    sim.disconnect("dev-1")  # no DISCONNECT: the broker publishes the Last Will
    wait_for(lambda: not cp.fleet.get("dev-1").online, 10, what="Last Will marks dev-1 offline")


def test_audit_health_reflection_and_metrics(
    cp_factory: Callable[..., ControlPlane], build: Callable[..., Artifact]
) -> None:
    cp = cp_factory(metrics_listen="127.0.0.1:0")
    with ControlPlaneClient(cp.address) as client:
        push_artifact(client, build(version=1).root)
        rpc_error(lambda: client.rollouts.Abort(RP.RolloutActionRequest(id="r-missing")))
        entries = client.audit.List(RP.ListAuditRequest()).entries
        actions = [(e.action.rsplit("/", 1)[-1], e.outcome) for e in entries]
        assert (
            ("Abort", "NOT_FOUND") in actions
            and ("Upload", "OK") in actions
            and ("PlanUpload", "OK") in actions
        )
        assert all(e.actor.identity == "anonymous" and "127.0.0.1" in e.actor.peer for e in entries)
        assert all("manifest" not in e.details for e in entries)
        health = health_pb2_grpc.HealthStub(client.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="edgectl.v1.RolloutService"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        reply = next(
            reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {"edgectl.v1.ArtifactService", "edgectl.v1.FleetService", "grpc.health.v1.Health"} <= names
    text = urllib.request.urlopen(f"http://127.0.0.1:{cp.metrics.port}/metrics", timeout=5).read().decode()
    assert 'edgectl_rollouts{state="running"}' in text and "edgectl_devices" in text
    assert 'edgectl_grpc_errors_total{code="NOT_FOUND",method="/edgectl.v1.RolloutService/Abort"} 1.0' in text


def test_chunks_over_mqtt(
    cp: ControlPlane, client: ControlPlaneClient, mosquitto: Any, build: Callable[..., Artifact]
) -> None:
    art = build(version=1)
    push_artifact(client, art.root)
    topics = DeviceTopics("edge-1")
    mqtt = MqttTestClient(mosquitto.host, mosquitto.port)
    mqtt.connect()
    try:
        mqtt.subscribe(topics.chunk_data)
        wanted = [c.digest for c in art.manifest.file("model.onnx").chunks][:2]
        request = mqtt_pb2.ChunkRequest(request_id="q1", artifact_digest=art.digest, chunk_digests=wanted)
        mqtt.publish(topics.chunk_requests, encode(request))
        got = [decode(mqtt.expect(10).payload, mqtt_pb2.ChunkData) for _ in wanted]
        assert [g.chunk_digest for g in got] == wanted and [g.last for g in got] == [False, True]
        assert all("sha256:" + hashlib.sha256(g.data).hexdigest() == g.chunk_digest for g in got)
        mqtt.publish(
            topics.chunk_requests,
            encode(
                mqtt_pb2.ChunkRequest(
                    request_id="q2", artifact_digest="sha256:" + "0" * 64, chunk_digests=wanted
                )
            ),
        )
        error = decode(mqtt.expect(10).payload, mqtt_pb2.ChunkData)
        assert error.request_id == "q2" and error.last and error.error and not error.data
    finally:
        mqtt.close()
