"""Real gRPC over TLS on a free port: tokens, roles and client certificates, checked on every call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgectl.ports import free_port
from edgectl.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, rollouts_pb2, rollouts_pb2_grpc
from edgectl.security.grpc_auth import AuthInterceptor, current_identity, required_role
from edgectl.security.pki import FleetCA
from edgectl.security.tokens import Role, TokenIssuer


class RecordingRollouts(rollouts_pb2_grpc.RolloutServiceServicer):  # type: ignore[misc]
    """Answers with the identity the interceptor handed over, so tests see what the audit log would."""

    def Create(self, request: Any, context: Any) -> Any:
        who = current_identity()
        return rollouts_pb2.Rollout(id="r-1", created_by=f"{who.subject}/{who.via}" if who else "")

    def List(self, request: Any, context: Any) -> Any:
        return rollouts_pb2.ListRolloutsResponse()


class TinyArtifacts(artifacts_pb2_grpc.ArtifactServiceServicer):  # type: ignore[misc]
    def Get(self, request: Any, context: Any) -> Any:
        who = current_identity()
        return artifacts_pb2.Artifact(uploaded_by=who.subject if who else "")

    def Download(self, request: Any, context: Any) -> Iterator[Any]:
        yield artifacts_pb2.DownloadChunk(path=current_identity().subject)  # type: ignore[union-attr]


@dataclass
class Server:
    """One server, two listeners: TLS + tokens for people and CI, mTLS for agents."""

    port: int
    device_port: int
    ca: FleetCA
    issuer: TokenIssuer

    def channel(
        self, token: str | None = None, client: Any = None, ca_pem: bytes | None = None
    ) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_pem or self.ca.cert_pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.cert_pem if client else None,
        )
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(f"localhost:{self.device_port if client else self.port}", creds)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    ca = FleetCA.create()
    issuer = TokenIssuer.load_or_create(tmp_path_factory.mktemp("keys") / "token.key")
    server_cert = ca.issue_server(["localhost", "127.0.0.1"])
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(4), interceptors=[AuthInterceptor(issuer.verifier())]
    )
    rollouts_pb2_grpc.add_RolloutServiceServicer_to_server(RecordingRollouts(), grpc_server)
    artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(TinyArtifacts(), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), grpc_server)
    pair = [(server_cert.key_pem, server_cert.cert_pem)]
    port, device_port = free_port(), free_port()
    grpc_server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(pair))
    grpc_server.add_secure_port(
        f"127.0.0.1:{device_port}",
        grpc.ssl_server_credentials(pair, root_certificates=ca.cert_pem, require_client_auth=True),
    )
    grpc_server.start()
    yield Server(port, device_port, ca, issuer)
    grpc_server.stop(0)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def test_no_token_is_unauthenticated(server: Server) -> None:
    stub = rollouts_pb2_grpc.RolloutServiceStub(server.channel())
    assert (
        _code(lambda: stub.List(rollouts_pb2.ListRolloutsRequest(), timeout=5))
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_viewer_reads_but_cannot_deploy(server: Server) -> None:
    stub = rollouts_pb2_grpc.RolloutServiceStub(server.channel(server.issuer.issue("vera", Role.VIEWER)))
    stub.List(rollouts_pb2.ListRolloutsRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.Create(rollouts_pb2.CreateRolloutRequest(artifact="a"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "deployer" in (info.value.details() or "")


def test_deployer_deploys_and_the_servicer_sees_who(server: Server) -> None:
    stub = rollouts_pb2_grpc.RolloutServiceStub(server.channel(server.issuer.issue("ci-bot", Role.DEPLOYER)))
    assert (
        stub.Create(rollouts_pb2.CreateRolloutRequest(artifact="a"), timeout=5).created_by == "ci-bot/token"
    )


def test_expired_forged_and_altered_tokens_are_refused(server: Server) -> None:
    expired = server.issuer.issue("old", Role.ADMIN, ttl_s=60, now=time.time() - 3600)
    forged = TokenIssuer(__import__("cryptography.hazmat.primitives.asymmetric.ed25519", fromlist=["x"])
                         .Ed25519PrivateKey.generate()).issue("mallory", Role.ADMIN)  # fmt: skip
    viewer = server.issuer.issue("vera", Role.VIEWER)
    prefix, body, sig = viewer.split(".")
    import base64
    import json

    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["role"] = "admin"
    altered_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for token in (expired, forged, f"{prefix}.{altered_body}.{sig}", "edgectl.garbage", "not-a-token"):
        stub = rollouts_pb2_grpc.RolloutServiceStub(server.channel(token))
        assert _code(lambda s=stub: s.List(rollouts_pb2.ListRolloutsRequest(), timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), token


def test_device_certificate_fetches_artifacts_and_nothing_more(server: Server) -> None:
    device = server.ca.issue_client("cam-07")
    channel = server.channel(client=device)
    artifacts = artifacts_pb2_grpc.ArtifactServiceStub(channel)
    assert artifacts.Get(artifacts_pb2.GetArtifactRequest(artifact="x"), timeout=5).uploaded_by == "cam-07"
    assert [c.path for c in artifacts.Download(artifacts_pb2.DownloadRequest(digest="x"), timeout=5)] == [
        "cam-07"
    ]
    rollouts = rollouts_pb2_grpc.RolloutServiceStub(channel)
    assert _code(lambda: rollouts.List(rollouts_pb2.ListRolloutsRequest(), timeout=5)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def _refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_certificate_from_another_ca_is_refused(server: Server) -> None:
    get = artifacts_pb2.GetArtifactRequest(artifact="x")
    member = artifacts_pb2_grpc.ArtifactServiceStub(server.channel(client=server.ca.issue_client("cam-07")))
    # Positive control: the same device id with the fleet CA's certificate is served on this listener.
    assert member.Get(get, timeout=5).uploaded_by == "cam-07"

    stranger = FleetCA.create("someone else's CA").issue_client("cam-07")
    no_cert = grpc.secure_channel(
        f"localhost:{server.device_port}", grpc.ssl_channel_credentials(server.ca.cert_pem)
    )
    for channel in (server.channel(client=stranger), no_cert):
        stub = artifacts_pb2_grpc.ArtifactServiceStub(channel)
        err = _refusal(lambda s=stub: s.Get(get, timeout=5))
        # The mTLS handshake fails before any RPC: the server took the connection and closed it,
        # which a dead or absent server ("Connection refused") would not do.
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "Connection refused" not in (err.details() or ""), err.details()

    # ...and the listener still serves its members after refusing the strangers.
    assert member.Get(get, timeout=5).uploaded_by == "cam-07"


def test_a_dead_listener_is_told_apart_from_a_refusal(server: Server) -> None:
    # Negative control for the check above: nothing listens on a fresh free port.
    dead = grpc.secure_channel(f"localhost:{free_port()}", grpc.ssl_channel_credentials(server.ca.cert_pem))
    stub = artifacts_pb2_grpc.ArtifactServiceStub(dead)
    err = _refusal(lambda: stub.Get(artifacts_pb2.GetArtifactRequest(artifact="x"), timeout=5))
    assert "Connection refused" in (err.details() or ""), err.details()


def test_health_is_public_and_unknown_methods_need_admin(server: Server) -> None:
    health_stub = health_pb2_grpc.HealthStub(server.channel())
    assert health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1  # SERVING
    assert required_role("/edgectl.v1.NewService/Anything") == Role.ADMIN
    assert required_role("/edgectl.v1.FleetService/Enroll") is None


def test_role_parsing_names_the_choices() -> None:
    with pytest.raises(Exception, match="viewer"):
        Role.parse("superuser")
