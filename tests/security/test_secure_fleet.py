"""Issue #8 end to end: a real mosquitto running the config `edgectl broker config` writes, a
control plane serving its two secured listeners on free ports, enrollment, revocation, and a
real agent that enrolls and converges. Nothing here is mocked; every check attacks something.
"""

from __future__ import annotations

import json
import logging
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from edgectl.agent.enroll import make_key_and_csr
from edgectl.artifact import TrustStore
from edgectl.client import ClientCredentials, ControlPlaneClient, push_artifact
from edgectl.control_plane.config import ControlPlaneConfig
from edgectl.control_plane.device_state import Status
from edgectl.control_plane.server import ControlPlane
from edgectl.errors import EdgectlError
from edgectl.mqtt.wire import DeviceTopics, encode
from edgectl.protos.v1 import artifacts_pb2 as AP
from edgectl.protos.v1 import common_pb2, fleet_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.pki import FleetCA, certificate_identity
from edgectl.security.tokens import Role, TokenIssuer
from tests.agent.onnx_models import mlp_artifact
from tests.control_plane.sim_device import wait_for
from tests.security.conftest import SecuredFleet, secured_fleet

NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredFleet]:
    with secured_fleet(tmp_path_factory.mktemp("secured"), metrics_listen="127.0.0.1:0") as fleet:
        yield fleet


def _code(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details() or ""


def test_people_need_a_valid_token_with_the_right_role_and_the_audit_names_them(fleet: SecuredFleet) -> None:
    request = RP.ListRolloutsRequest()
    with fleet.client() as nobody:
        code, message = _code(lambda: nobody.rollouts.List(request, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in message
    plaintext = grpc.insecure_channel(fleet.cp.address)
    assert _code(lambda: RP_stub(plaintext).List(request, timeout=5))[0] == grpc.StatusCode.UNAVAILABLE
    plaintext.close()

    with fleet.client(fleet.token(Role.VIEWER, "vera")) as viewer:
        viewer.rollouts.List(request, timeout=10)
        code, message = _code(
            lambda: viewer.rollouts.Create(RP.CreateRolloutRequest(artifact="x"), timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "deployer" in message
    forged = TokenIssuer(__import__("cryptography.hazmat.primitives.asymmetric.ed25519", fromlist=["x"])
                         .Ed25519PrivateKey.generate()).issue("mallory", Role.ADMIN)  # fmt: skip
    expired = fleet.token(Role.ADMIN, "old", ttl_s=60, now=time.time() - 3600)
    for bad in (forged, expired):
        with fleet.client(bad) as c:
            assert (
                _code(lambda c=c: c.rollouts.List(request, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
            )

    art = mlp_artifact(fleet.work / "audit-art", fleet.work, fleet.key, name="audited")
    with fleet.client(fleet.token(Role.DEPLOYER, "ci-bot")) as deployer:
        pushed = push_artifact(deployer, art.root)
    assert pushed.artifact.uploaded_by == "ci-bot"
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        entries = admin.audit.List(RP.ListAuditRequest(action="/edgectl.v1.ArtifactService/Upload")).entries
        assert entries and entries[0].actor.identity == "ci-bot" and "127.0.0.1" in entries[0].actor.peer
        refused = admin.audit.List(RP.ListAuditRequest(action="/edgectl.v1.RolloutService/Create")).entries
    assert [(e.actor.identity, e.outcome) for e in refused] == [("vera", "PERMISSION_DENIED")]
    url = f"http://127.0.0.1:{fleet.cp.metrics.port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert (
        'code="UNAUTHENTICATED",method="/edgectl.v1.RolloutService/List"} 3.0' in text
    )  # none, forged, expired
    assert forged not in text and expired not in text  # no token in the metrics


def RP_stub(channel: grpc.Channel) -> Any:
    from edgectl.protos.v1 import rollouts_pb2_grpc

    return rollouts_pb2_grpc.RolloutServiceStub(channel)


def test_token_command_and_cli_credentials(fleet: SecuredFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.control_plane.test_cp_cli import APP

    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(fleet.work / "cfg"))
    monkeypatch.delenv("EDGECTL_TOKEN", raising=False)
    runner = CliRunner()
    minted = runner.invoke(APP, ["control-plane", "token", "--security-dir", str(fleet.layout.directory),
                                 "--role", "viewer", "--subject", "bob"])  # fmt: skip
    assert minted.exit_code == 0, minted.output
    token = minted.stdout.strip().splitlines()[-1]
    assert token.startswith("edgectl.")
    base = ["rollout", "ls", "--server", fleet.cp.address, "--ca", str(fleet.layout.ca_cert), "--json"]
    listed = runner.invoke(APP, base, env={"EDGECTL_TOKEN": token})
    assert listed.exit_code == 0 and json.loads(listed.stdout) == [] and token not in listed.output
    # A viewer describes a device without the audit trail, which is an admin's to read.
    fleet.cp.fleet.apply([Status("bob-cam", True, time.time())])
    described = runner.invoke(
        APP, ["devices", "describe", "bob-cam", *base[2:-1], "-o", "json"], env={"EDGECTL_TOKEN": token}
    )
    assert described.exit_code == 0, described.output
    assert (
        json.loads(described.stdout)["device"]["id"] == "bob-cam"
        and json.loads(described.stdout)["audit"] is None
    )
    refused = runner.invoke(APP, base).exception
    assert isinstance(refused, EdgectlError) and refused.exit_code == 8
    assert "control-plane token" in str(refused.hint)
    for listen in ("0.0.0.0:0", "127.0.0.1:0"):  # never unauthenticated by default, not even on loopback
        unsecured = runner.invoke(APP, ["control-plane", "serve", "--listen", listen])
        assert unsecured.exit_code != 0 and "--insecure" in str(unsecured.exception)


def test_a_revoked_token_is_refused_at_once_and_the_audit_says_who_revoked_it(
    fleet: SecuredFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.control_plane.test_cp_cli import APP

    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(fleet.work / "cfg"))
    runner = CliRunner()
    minted = runner.invoke(APP, ["control-plane", "token", "--security-dir", str(fleet.layout.directory),
                                 "--role", "deployer", "--subject", "carol", "--json"])  # fmt: skip
    assert minted.exit_code == 0, minted.output
    carol = json.loads(minted.stdout)
    request = RP.ListRolloutsRequest()
    with fleet.client(carol["token"]) as c:
        c.rollouts.List(request, timeout=10)
    remote = ["--server", fleet.cp.address, "--ca", str(fleet.layout.ca_cert)]

    def revoke(token: str, *args: str) -> Any:
        return runner.invoke(
            APP, ["control-plane", "revoke-token", *args, *remote], env={"EDGECTL_TOKEN": token}
        )

    own = revoke(carol["token"], carol["token"])  # a deployer may not revoke, not even itself
    assert isinstance(own.exception, EdgectlError) and own.exception.exit_code == 8
    admin = fleet.token(Role.ADMIN, "root")
    done = revoke(admin, carol["token"], "--reason", "left the team")
    assert done.exit_code == 0 and f"token {carol['id']} of carol revoked" in done.stdout, done.output
    again = revoke(admin, "--id", carol["id"])
    assert again.exit_code == 0 and "already revoked" in again.stdout
    with fleet.client(carol["token"]) as c:
        code, message = _code(lambda: c.rollouts.List(request, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in message

    neither = revoke(admin).exception
    assert isinstance(neither, EdgectlError) and neither.exit_code == 2
    bad_id = revoke(admin, "--id", "not-an-id")
    assert isinstance(bad_id.exception, EdgectlError) and "16 hex digits" in str(bad_id.exception)
    with fleet.client(admin) as c:
        entries = c.audit.List(RP.ListAuditRequest(action="/edgectl.v1.FleetService/RevokeToken")).entries
    ok = [e for e in entries if e.outcome == "OK"]
    assert [(e.actor.identity, e.target) for e in ok] == [("root", carol["id"])] * 2
    assert any(e.actor.identity == "carol" and e.outcome == "PERMISSION_DENIED" for e in entries)
    assert all(carol["token"] not in e.details for e in entries)


def test_enrollment_gives_a_certificate_and_a_confined_broker_identity(fleet: SecuredFleet) -> None:
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        token = admin.fleet.CreateEnrollmentToken(fleet_pb2.CreateEnrollmentTokenRequest(device_id="cam-a"))
        with fleet.client() as anonymous:
            enroll = anonymous.fleet.Enroll
            code, message = _code(
                lambda: enroll(fleet_pb2.EnrollRequest(device_id="cam-a", token=token.token))
            )
            assert (
                code == grpc.StatusCode.INVALID_ARGUMENT and "CSR" in message
            )  # and the token is not spent:
            key_pem, csr_pem = make_key_and_csr("cam-a")
            creds = enroll(fleet_pb2.EnrollRequest(device_id="cam-a", token=token.token, csr_pem=csr_pem))
            again = fleet_pb2.EnrollRequest(device_id="cam-a", token=token.token, csr_pem=csr_pem)
            assert _code(lambda: enroll(again))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert certificate_identity(creds.client_cert_pem) == "cam-a" and creds.ca_cert_pem == fleet.ca_pem
    assert creds.mqtt_url == fleet.layout.url and len(creds.trusted_keys) == 1
    with fleet.cp.store.tx() as tx:
        stored = str(tx.scalar("SELECT password_hash FROM devices WHERE id = ?", ("cam-a",)))
    assert creds.mqtt_password not in stored and stored.startswith("scrypt$")

    b, b_key = fleet.enroll("cam-b")
    ta, tb = DeviceTopics("cam-a"), DeviceTopics("cam-b")
    device_a = fleet.mqtt(creds.mqtt_username, creds.mqtt_password)
    assert not device_a.connect(timeout=15).is_failure
    assert [r.value for r in device_a.subscribe(ta.desired, timeout=15)] == [1]
    assert [r.value for r in device_a.subscribe(tb.desired, timeout=15)] == [NOT_AUTHORIZED]
    assert [r.value for r in device_a.subscribe("#", timeout=15)] == [NOT_AUTHORIZED]
    device_b = fleet.mqtt(b.mqtt_username, b.mqtt_password)
    assert not device_b.connect(timeout=15).is_failure
    device_b.subscribe(tb.desired, timeout=15)
    device_a.publish(tb.desired, b"hijack", retain=True)  # only the control plane writes desired state
    device_a.publish(tb.reported, b'{"deviceId": "cam-b", "agentVersion": "forged"}', retain=True)
    device_a.publish(ta.reported, b'{"deviceId": "cam-a", "agentVersion": "mine"}', retain=True)
    wait_for(lambda: fleet.cp.fleet.get("cam-a").agent_version == "mine", 10, what="cam-a's own report")
    assert device_b.nothing_arrives(0.5)
    assert fleet.cp.fleet.get("cam-b").agent_version != "forged"

    # mTLS: the enrolled certificate fetches artifacts, and only that; another CA's is refused.
    artifacts = AP_stub(fleet.device_channel(creds.client_cert_pem, key_pem))
    art = mlp_artifact(fleet.work / "mtls-art", fleet.work, fleet.key, name="mtls")
    with fleet.client(fleet.token(Role.DEPLOYER)) as deployer:
        digest = push_artifact(deployer, art.root).artifact.ref.digest
        # A device fetches only what is deployed to it (tests/security/test_control_plane_attacks.py):
        # roll the artifact out to both (offline, so the rollout waits with their desired state set).
        for device_id in ("cam-a", "cam-b"):
            deployer.fleet.LabelDevice(fleet_pb2.LabelDeviceRequest(id=device_id, set={"ring": "mtls"}))
        deployer.rollouts.Create(RP.CreateRolloutRequest(
            artifact=digest, selector=common_pb2.Selector(match_labels={"ring": "mtls"}),
            strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=600),
        ))  # fmt: skip
    wait_for(lambda: min(fleet.cp.fleet.get(d).generation for d in ("cam-a", "cam-b")) >= 1, 20,
             what="cam-a's and cam-b's desired state naming the artifact")  # fmt: skip
    assert artifacts.Get(AP.GetArtifactRequest(artifact=digest), timeout=10).ref.digest == digest
    device_rollouts = RP_stub(fleet.device_channel(creds.client_cert_pem, key_pem))
    code, _ = _code(lambda: device_rollouts.List(RP.ListRolloutsRequest(), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    stranger = FleetCA.create("someone else's CA").issue_client("cam-a")
    foreign = AP_stub(fleet.device_channel(stranger.cert_pem, stranger.key_pem))
    assert _code(lambda: foreign.Get(AP.GetArtifactRequest(artifact=digest), timeout=10))[0] == (
        grpc.StatusCode.UNAVAILABLE  # the handshake fails before any RPC
    )

    # Re-enrolling rotates both: cam-b's first certificate and password stop working.
    old_cert = AP_stub(fleet.device_channel(b.client_cert_pem, b_key))
    assert old_cert.Get(AP.GetArtifactRequest(artifact=digest), timeout=10).ref.digest == digest
    b2, b2_key = fleet.enroll("cam-b")
    assert b2.mqtt_password != b.mqtt_password
    code, message = _code(lambda: old_cert.Get(AP.GetArtifactRequest(artifact=digest), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "re-enrolled" in message
    new_cert = AP_stub(fleet.device_channel(b2.client_cert_pem, b2_key))
    assert new_cert.Get(AP.GetArtifactRequest(artifact=digest), timeout=10).ref.digest == digest
    device_b.disconnected.get(timeout=10)  # the broker dropped the old identity's connection
    old_b = fleet.mqtt(b.mqtt_username, b.mqtt_password)
    assert old_b.connect(timeout=15).is_failure
    old_b.close()

    # Decommission revokes both: the broker kicks the device, and the certificate stops working.
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        admin.fleet.DecommissionDevice(fleet_pb2.DecommissionDeviceRequest(id="cam-a"))
    device_a.disconnected.get(timeout=10)
    device_a.close()
    revoked = fleet.mqtt(creds.mqtt_username, creds.mqtt_password)
    assert revoked.connect(timeout=15).is_failure
    revoked.close()
    code, message = _code(lambda: artifacts.Get(AP.GetArtifactRequest(artifact=digest), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in message
    device_b.close()


def test_removing_a_device_that_never_joined_withdraws_its_token(fleet: SecuredFleet) -> None:
    """With a broker to provision, rm of an enrolled-but-not-joined device answered NOT_FOUND
    (it looked the device up to revoke its broker identity) and the token could still join."""
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        token = admin.fleet.CreateEnrollmentToken(fleet_pb2.CreateEnrollmentTokenRequest(device_id="cam-n"))
        done = admin.fleet.DecommissionDevice(fleet_pb2.DecommissionDeviceRequest(id="cam-n"))
        assert done.enrollment_only
    _, csr_pem = make_key_and_csr("cam-n")
    with fleet.client() as anonymous:
        code, message = _code(
            lambda: anonymous.fleet.Enroll(
                fleet_pb2.EnrollRequest(device_id="cam-n", token=token.token, csr_pem=csr_pem)
            )
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not valid for device cam-n" in message


def AP_stub(channel: grpc.Channel) -> Any:
    from edgectl.protos.v1 import artifacts_pb2_grpc

    return artifacts_pb2_grpc.ArtifactServiceStub(channel)


def test_enrolled_agent_gets_its_credentials_and_converges(
    fleet: SecuredFleet, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgectl.agent.agent import Agent
    from edgectl.agent.config import AgentConfig

    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "cfg"))
    caplog.set_level(logging.DEBUG)
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        token = admin.fleet.CreateEnrollmentToken(
            fleet_pb2.CreateEnrollmentTokenRequest(device_id="edge-1", labels={"site": "secure"})
        ).token
    data = tmp_path / "agent"
    config = AgentConfig(
        device_id="edge-1", data_dir=data, listen="127.0.0.1:0", profile="x86-cpu-avx2", heartbeat_s=1.0,
        intra_op_threads=1, transport="grpc", control_plane=fleet.cp.device_address,
        enroll_server=fleet.cp.address, enroll_token=token, ca_file=fleet.layout.ca_cert,
    ).validate()  # fmt: skip
    agent = Agent(config)
    agent.start()
    try:
        for secret in ("credentials.json", "device.key"):
            assert stat.S_IMODE((data / secret).stat().st_mode) == 0o600, secret
        password = json.loads((data / "credentials.json").read_text())["mqttPassword"]
        wait_for(
            lambda: fleet.cp.fleet.get("edge-1").online, 20, what="the enrolled agent online via TLS MQTT"
        )
        art = mlp_artifact(fleet.work / "agent-art", fleet.work, fleet.key, name="secure-mlp")
        with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
            digest = push_artifact(deployer, art.root).artifact.ref.digest
            rollout = deployer.rollouts.Create(RP.CreateRolloutRequest(
                artifact=digest, selector=common_pb2.Selector(match_labels={"site": "secure"}),
                strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=60),
            ))  # fmt: skip
            list(deployer.rollouts.Watch(RP.WatchRolloutRequest(id=rollout.id), timeout=90))
            final = deployer.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
        assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
        assert final.created_by == "ci"
        assert fleet.cp.fleet.get("edge-1").models["secure-mlp"].digest == digest
    finally:
        agent.stop()
    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert password not in logged and token not in logged
    # A restarted agent keeps its credentials: the spent token is not used again.
    again = Agent(config)
    assert again.creds is not None and again.creds.mqtt_password == password


def test_agent_enrollment_refusals_write_nothing(fleet: SecuredFleet, tmp_path: Path) -> None:
    from edgectl.agent.config import AgentConfig
    from edgectl.agent.enroll import enroll
    from edgectl.agent.errors import ConfigError

    base = {"device_id": "edge-x", "data_dir": tmp_path / "agent", "control_plane": fleet.cp.device_address,
            "enroll_server": fleet.cp.address, "enroll_token": "not-a-token"}  # fmt: skip
    with pytest.raises(ConfigError, match="--ca-file"):
        enroll(AgentConfig(**base).validate())
    with pytest.raises(ConfigError, match="PERMISSION_DENIED") as info:
        enroll(AgentConfig(**base, ca_file=fleet.layout.ca_cert).validate())
    assert "edgectl devices enroll edge-x" in str(info.value.hint)
    stranger = tmp_path / "other-ca.crt"
    stranger.write_bytes(FleetCA.create("not the fleet").cert_pem)
    with pytest.raises(
        ConfigError, match="UNAVAILABLE"
    ) as info:  # the control plane's certificate is not trusted
        enroll(AgentConfig(**base, ca_file=stranger).validate())
    assert "--ca-file" in str(info.value.hint)
    mtls_only = {**base, "enroll_server": None}  # enrolling at the agents' listener: no certificate yet
    with pytest.raises(ConfigError, match="UNAVAILABLE"):
        enroll(AgentConfig(**mtls_only, ca_file=fleet.layout.ca_cert).validate())
    assert not (tmp_path / "agent").exists() or not any((tmp_path / "agent").iterdir())


def test_secured_replicas_share_tokens_and_a_follower_enrolls(
    fleet: SecuredFleet,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    def replica() -> ControlPlane:
        config = ControlPlaneConfig(
            listen="127.0.0.1:0", device_listen="127.0.0.1:0", security_dir=fleet.layout.directory,
            state_url=postgres_url, blobs=str(tmp_path / "blobs"), tick_seconds=0.1, leader_interval=0.2,
        )  # fmt: skip
        plane = ControlPlane(config, trust=TrustStore([fleet.key.public_key]))
        plane.start()
        return plane

    first = replica()
    second: ControlPlane | None = None
    try:
        assert first.election.leading.wait(10)
        second = replica()
        assert first.security is not None
        token = first.security.issuer.issue("ops", Role.ADMIN)  # one key in the shared security dir
        with ControlPlaneClient(second.address, 20, ClientCredentials(token, fleet.ca_pem)) as ops:
            minted = ops.fleet.CreateEnrollmentToken(
                fleet_pb2.CreateEnrollmentTokenRequest(device_id="cam-r")
            )
            _key, csr = make_key_and_csr("cam-r")
            creds = ops.fleet.Enroll(
                fleet_pb2.EnrollRequest(device_id="cam-r", token=minted.token, csr_pem=csr)
            )
        assert not second.leading  # the follower enrolled: it provisioned the broker itself
        with ControlPlaneClient(second.address, 20, ClientCredentials(token, fleet.ca_pem)) as ops:
            ops.fleet.RevokeToken(fleet_pb2.RevokeTokenRequest(token=token))
        with ControlPlaneClient(first.address, 20, ClientCredentials(token, fleet.ca_pem)) as ops:
            code, message = _code(lambda: ops.rollouts.List(RP.ListRolloutsRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in message  # on the other replica too
        device = fleet.mqtt(creds.mqtt_username, creds.mqtt_password)
        assert not device.connect(timeout=15).is_failure
        online = mqtt_pb2.DeviceStatus(device_id="cam-r", online=True)
        device.publish(DeviceTopics("cam-r").status, encode(online), retain=True)
        first.stop(grace=0)
        assert second.election.leading.wait(10), "the survivor did not take over"
        wait_for(lambda: second.fleet.get("cam-r").online, 10, what="the survivor sees cam-r online")
        device.close()
    finally:
        for plane in (first, second):
            if plane is not None:
                plane.stop(grace=0)
