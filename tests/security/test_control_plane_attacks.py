"""Security v2, control-plane rows, each performed against a real secured control plane.

Row 5: a viewer opening more Watch streams than there are worker threads; row 7: an anonymous
Enroll with megabytes of strings (the audit row) and Enroll guessing at full speed; row 8: a
device id naming the control plane's broker login; row 13: a device fetching an artifact never
deployed to it; row 14: a revocation by id outliving every token it could name. Each has a
positive control: the legitimate path still works.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from edgectl.agent.enroll import make_key_and_csr
from edgectl.client import push_artifact
from edgectl.control_plane.revocations import TokenRevocations
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import artifacts_pb2 as AP
from edgectl.protos.v1 import artifacts_pb2_grpc, fleet_pb2, rollouts_pb2_grpc
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.protos.v1.mqtt_pb2 import ChunkData, ChunkRequest
from edgectl.security.errors import TokenError
from edgectl.security.tokens import MAX_TOKEN_TTL_S, PREFIX, Role
from tests.agent.onnx_models import mlp_artifact
from tests.harness.mqtt import MqttTestClient
from tests.security.conftest import SecuredFleet, secured_fleet

ENROLL_BURST = 4
ENROLL_REFILL_S = 1.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredFleet]:
    work = tmp_path_factory.mktemp("attacks")
    overrides = {"enroll_failure_burst": ENROLL_BURST, "enroll_failure_refill_s": ENROLL_REFILL_S}
    with secured_fleet(work, **overrides) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def deployed(fleet: SecuredFleet) -> dict[str, Any]:
    """cam-1 enrolled (offline), artifact ``one`` rolled out to it (the rollout waits), ``two`` never."""
    creds, key_pem = fleet.enroll("cam-1")
    digests = {}
    with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
        for name in ("one", "two"):
            art = mlp_artifact(fleet.work / f"art-{name}", fleet.work, fleet.key, name=name)
            digests[name] = push_artifact(deployer, art.root).artifact.ref.digest
    rollout = fleet.roll_out("cam-1", digests["one"], ring="attack")  # the desired state names `one`
    return {"creds": creds, "key": key_pem, "digests": digests, "rollout": rollout}


def _code(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details() or ""


def test_row5_a_viewer_cannot_take_every_worker_thread(fleet: SecuredFleet, deployed: dict[str, Any]) -> None:
    viewer = fleet.client(fleet.token(Role.VIEWER, "vera"))
    streams = [viewer.rollouts.Watch(RP.WatchRolloutRequest(id=deployed["rollout"]), timeout=60)
               for _ in range(fleet.cp.config.workers)]  # fmt: skip

    def first(stream: Any) -> str:
        try:
            next(stream)
            return "open"
        except grpc.RpcError as exc:
            assert "open streams" in (exc.details() or ""), exc.details()
            return exc.code().name

    with futures.ThreadPoolExecutor(len(streams)) as pool:
        outcomes = list(pool.map(first, streams))
    assert outcomes.count("open") == fleet.cp.config.streams_per_caller
    assert outcomes.count("RESOURCE_EXHAUSTED") == len(streams) - fleet.cp.config.streams_per_caller
    # While vera's streams stay open: a device and another person are served at once.
    device = artifacts_pb2_grpc.ArtifactServiceStub(
        fleet.device_channel(deployed["creds"].client_cert_pem, deployed["key"])
    )
    got = device.Get(AP.GetArtifactRequest(artifact=deployed["digests"]["one"]), timeout=5)
    assert got.ref.digest == deployed["digests"]["one"]
    with fleet.client(fleet.token(Role.DEPLOYER, "dora")) as dora:
        assert (
            dora.rollouts.Get(RP.GetRolloutRequest(id=deployed["rollout"]), timeout=5).id
            == deployed["rollout"]
        )
    for s in streams:
        s.cancel()
    viewer.close()
    # Closed streams give their slots back.
    deadline = time.monotonic() + 10
    with fleet.client(fleet.token(Role.VIEWER, "vera")) as again:
        while True:
            stream = again.rollouts.Watch(RP.WatchRolloutRequest(id=deployed["rollout"]), timeout=30)
            try:
                next(stream)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.2)
        stream.cancel()


def _audit_rows(fleet: SecuredFleet) -> list[tuple[int, int]]:
    with fleet.cp.store.tx() as tx:
        rows = tx.all("SELECT length(target), length(details) + length(identity) + length(peer) FROM audit_log "
                      "WHERE action = '/edgectl.v1.FleetService/Enroll'")  # fmt: skip
    return [(int(r[0]), int(r[1])) for r in rows]


def test_row7_anonymous_enroll_cannot_fill_the_audit_log(fleet: SecuredFleet) -> None:
    big = "x" * (8 << 20)
    with fleet.client() as anonymous:
        enroll = anonymous.fleet.Enroll
        for field in ("device_id", "token", "agent_version", "profile"):
            request = fleet_pb2.EnrollRequest(**{"device_id": "cam-big", "token": "t", field: big})
            code, message = _code(lambda r=request: enroll(r, timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and field in message and len(message) < 200
            time.sleep(ENROLL_REFILL_S)  # stay within the failure budget; its own test comes below
        code, _ = _code(lambda: enroll(fleet_pb2.EnrollRequest(device_id="cam-big", agent_version="v" * 100,
                                                                profile="p" * 100, token="guess"), timeout=30))  # fmt: skip
        assert code == grpc.StatusCode.PERMISSION_DENIED
        rows = _audit_rows(fleet)
        assert rows and all(target <= 256 and rest <= 4096 + 512 for target, rest in rows), rows
        # Guessing at full speed: after the burst, the peer is held off before any work or audit row.
        time.sleep(ENROLL_BURST * ENROLL_REFILL_S + 0.5)
        guess = fleet_pb2.EnrollRequest(device_id="cam-g", token="guess")
        codes = [_code(lambda: enroll(guess, timeout=10))[0] for _ in range(ENROLL_BURST + 3)]
        assert codes[:ENROLL_BURST] == [grpc.StatusCode.PERMISSION_DENIED] * ENROLL_BURST
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[ENROLL_BURST:]
        for _ in range(10):  # a slow host may refill one failure between two calls
            audited = len(_audit_rows(fleet))
            code, message = _code(lambda: enroll(guess, timeout=10))
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "try again" in message
        assert len(_audit_rows(fleet)) == audited  # held off before any work or audit row
    # Positive control: once the budget refills, a legitimate enrollment from the same host works.
    time.sleep(ENROLL_BURST * ENROLL_REFILL_S + 0.5)
    creds, _ = fleet.enroll("cam-legit")
    assert creds.device_id == "cam-legit" and creds.mqtt_password


def test_row8_a_device_id_cannot_delete_the_control_planes_broker_login(fleet: SecuredFleet) -> None:
    victim = fleet.layout.control_plane_username
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        code, message = _code(lambda: admin.fleet.CreateEnrollmentToken(
            fleet_pb2.CreateEnrollmentTokenRequest(device_id=victim), timeout=10))  # fmt: skip
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in message
    _key, csr = make_key_and_csr(victim)
    with fleet.client() as anonymous:
        code, message = _code(lambda: anonymous.fleet.Enroll(
            fleet_pb2.EnrollRequest(device_id=victim, token="any", csr_pem=csr), timeout=10))  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in message
    # The control plane's own login still works, and a normal device still enrolls.
    login = MqttTestClient("127.0.0.1", fleet.layout.port, username=victim,
                           password=fleet.layout.control_plane_password, tls_ca=str(fleet.layout.ca_cert))  # fmt: skip
    assert not login.connect(timeout=15).is_failure
    login.close()
    assert fleet.cp.bus.wait_connected(5)
    time.sleep(ENROLL_BURST * ENROLL_REFILL_S)  # the refused Enroll above spent one failure
    creds, _ = fleet.enroll("cam-ok")
    assert creds.mqtt_username == "cam-ok"


def test_row13_a_device_fetches_only_what_was_deployed_to_it(
    fleet: SecuredFleet, deployed: dict[str, Any]
) -> None:
    channel = fleet.device_channel(deployed["creds"].client_cert_pem, deployed["key"])
    device = artifacts_pb2_grpc.ArtifactServiceStub(channel)
    one, two = deployed["digests"]["one"], deployed["digests"]["two"]
    assert device.Get(AP.GetArtifactRequest(artifact=one), timeout=10).ref.digest == one  # positive control
    got = list(device.Download(AP.DownloadRequest(digest=one, path="model.onnx"), timeout=10))
    assert got and got[0].data
    for call in (
        lambda: device.Get(AP.GetArtifactRequest(artifact=two), timeout=10),
        lambda: device.Get(AP.GetArtifactRequest(artifact="two"), timeout=10),  # by name, too
        lambda: list(device.Download(AP.DownloadRequest(digest=two, path="model.onnx"), timeout=10)),
    ):
        code, message = _code(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not deployed" in message
    listing = rollouts_pb2_grpc.RolloutServiceStub(channel)
    assert (
        _code(lambda: listing.List(RP.ListRolloutsRequest(), timeout=10))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    with fleet.client(fleet.token(Role.VIEWER, "vera")) as person:  # people keep their view of everything
        assert person.artifacts.Get(AP.GetArtifactRequest(artifact=two), timeout=10).ref.digest == two

    # The same over MQTT: chunk requests on the device's own topic (the broker vouches for who it is).
    creds, topics = deployed["creds"], DeviceTopics("cam-1")
    mqtt = fleet.mqtt(creds.mqtt_username, creds.mqtt_password)
    assert not mqtt.connect(timeout=15).is_failure
    mqtt.subscribe(topics.chunk_data, timeout=15)
    for digest, request_id in ((one, "mine"), (two, "theirs")):
        mqtt.publish(topics.chunk_requests, encode(ChunkRequest(request_id=request_id, artifact_digest=digest,
                                                                 manifest=True)))  # fmt: skip
        answer = decode(mqtt.expect(15).payload, ChunkData)
        assert answer.request_id == request_id
        if digest == one:
            assert answer.manifest and not answer.error  # positive control
        else:
            assert not answer.manifest and "not deployed" in answer.error
    mqtt.close()


def _signed(fleet: SecuredFleet, claims: dict[str, Any]) -> str:
    assert fleet.cp.security is not None
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()  # noqa: E731
    body = b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    signature = fleet.cp.security.issuer.key.sign(f"{PREFIX}.{body}".encode())
    return f"{PREFIX}.{body}.{b64(signature)}"


def test_row14_revocations_outlive_every_token_they_name(fleet: SecuredFleet) -> None:
    assert fleet.cp.security is not None
    issuer, verifier = fleet.cp.security.issuer, fleet.cp.security.verifier
    with pytest.raises(TokenError, match="at most 366 days"):
        issuer.issue("forever", Role.ADMIN, ttl_s=1000 * 86400)
    now = int(time.time())
    forever = _signed(fleet, {"sub": "forever", "role": "admin", "iat": now, "exp": now + 1000 * 86400,
                              "jti": "ab" * 8, "kid": issuer.key_id})  # fmt: skip
    with fleet.client(forever) as c:
        code, message = _code(lambda: c.rollouts.List(RP.ListRolloutsRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "lifetime" in message
    longest = issuer.issue("ops", Role.ADMIN, ttl_s=MAX_TOKEN_TTL_S)
    with fleet.client(longest) as c:  # positive control: the longest allowed token works
        c.rollouts.List(RP.ListRolloutsRequest(), timeout=10)
    token_id = verifier.verify(longest).token_id
    with fleet.client(fleet.token(Role.ADMIN, "root")) as admin:
        admin.fleet.RevokeToken(fleet_pb2.RevokeTokenRequest(token_id=token_id), timeout=10)
    # Just before the token's own expiry a sweep (any later revocation) must not forget it.
    revocations = TokenRevocations(fleet.cp.store)
    late = time.time() + MAX_TOKEN_TTL_S - 60
    verifier.verify(longest, now=late)  # still valid by its signature and expiry ...
    revocations.revoke(verifier, token_id="cd" * 8, by="root", now=late)
    assert revocations.revoked(token_id)  # ... so its revocation is still there
    with fleet.client(longest) as c:
        code, message = _code(lambda: c.rollouts.List(RP.ListRolloutsRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in message
