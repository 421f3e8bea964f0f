"""Fixtures the security tests share with the control plane's (a throwaway PostgreSQL schema)
and the agent's (signed artifacts and real agents, for the attacks on the serving path), and the
secured fleet (a real mosquitto plus a secured control plane) the attack tests start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgectl.agent.enroll import make_key_and_csr
from edgectl.artifact import SigningKey, TrustStore
from edgectl.broker import MosquittoProcess
from edgectl.client import ClientCredentials, ControlPlaneClient
from edgectl.control_plane.config import ControlPlaneConfig
from edgectl.control_plane.server import ControlPlane
from edgectl.mqtt.wire import agent_client_id
from edgectl.protos.v1 import common_pb2, fleet_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.broker_files import BrokerLayout
from edgectl.security.tokens import Role
from tests.agent.conftest import bundles, make_agent, trust_file
from tests.conftest import start_secured_broker
from tests.control_plane.conftest import postgres_url
from tests.harness.mqtt import MqttTestClient

__all__ = ["SecuredFleet", "bundles", "make_agent", "postgres_url", "secured_fleet", "trust_file"]


@dataclass
class SecuredFleet:
    """A real mosquitto on `edgectl broker config`'s files and a secured control plane using it."""

    layout: BrokerLayout
    broker: MosquittoProcess
    cp: ControlPlane
    key: SigningKey
    work: Path

    @property
    def ca_pem(self) -> bytes:
        return self.layout.ca_cert.read_bytes()

    def token(self, role: Role, subject: str = "tester", **kw: Any) -> str:
        assert self.cp.security is not None
        return self.cp.security.issuer.issue(subject, role, **kw)

    def client(self, token: str | None = None) -> ControlPlaneClient:
        return ControlPlaneClient(self.cp.address, 20, ClientCredentials(token=token, ca_pem=self.ca_pem))

    def device_channel(self, cert_pem: bytes, key_pem: bytes) -> grpc.Channel:
        creds = ClientCredentials(ca_pem=self.ca_pem, client_cert_pem=cert_pem, client_key_pem=key_pem)
        return grpc.secure_channel(self.cp.device_address, creds.channel_credentials())

    def mqtt(self, username: str, password: str) -> MqttTestClient:
        # A device's broker login is pinned to its agent's client id.
        return MqttTestClient("127.0.0.1", self.layout.port, agent_client_id(username), username=username,
                              password=password, tls_ca=str(self.layout.ca_cert))  # fmt: skip

    def enroll(self, device_id: str) -> tuple[fleet_pb2.DeviceCredentials, bytes]:
        """Enroll like an agent does (own key, CSR, TLS without a token); returns (creds, key)."""
        with self.client(self.token(Role.ADMIN, "admin")) as admin:
            token = admin.fleet.CreateEnrollmentToken(
                fleet_pb2.CreateEnrollmentTokenRequest(device_id=device_id)
            )
        key_pem, csr_pem = make_key_and_csr(device_id)
        with self.client() as anonymous:
            creds = anonymous.fleet.Enroll(
                fleet_pb2.EnrollRequest(device_id=device_id, token=token.token, csr_pem=csr_pem), timeout=20
            )
        return creds, key_pem

    def roll_out(self, device_id: str, digest: str, ring: str) -> str:
        """Label ``device_id`` into ``ring``, roll ``digest`` out to that ring (its health wait long)
        and wait until the device's desired state names it; returns the rollout's id."""
        with self.client(self.token(Role.ADMIN, "admin")) as admin:
            admin.fleet.LabelDevice(fleet_pb2.LabelDeviceRequest(id=device_id, set={"ring": ring}))
        with self.client(self.token(Role.DEPLOYER, "ci")) as deployer:
            rollout = deployer.rollouts.Create(RP.CreateRolloutRequest(
                artifact=digest, selector=common_pb2.Selector(match_labels={"ring": ring}),
                strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=600),
            ))  # fmt: skip
        deadline = time.monotonic() + 20
        while self.cp.fleet.get(device_id).generation < 1:
            assert time.monotonic() < deadline, f"the rollout never wrote {device_id}'s desired state"
            time.sleep(0.1)
        return str(rollout.id)


@contextmanager
def secured_fleet(work: Path, **overrides: Any) -> Iterator[SecuredFleet]:
    """Start a broker on fresh certificates and a secured control plane (SQLite and blobs under
    ``work``; ``overrides`` are extra ControlPlaneConfig fields); stop both on exit."""
    layout, broker = start_secured_broker(work / "fleet", hostnames=("localhost", "127.0.0.1"))
    key = SigningKey.generate()
    settings: dict[str, Any] = {
        "state_url": f"sqlite:///{work}/cp.db", "blobs": str(work / "blobs"), "tick_seconds": 0.1,
        "leader_interval": 0.2, **overrides,
    }  # fmt: skip
    config = ControlPlaneConfig(listen="127.0.0.1:0", device_listen="127.0.0.1:0",
                                security_dir=layout.directory, **settings)  # fmt: skip
    cp = ControlPlane(config, trust=TrustStore([key.public_key]))
    cp.start()
    try:
        assert cp.security is not None and cp.election.leading.wait(10) and cp.bus.wait_connected(10), (
            "the control plane did not lead or reach the secured broker with its credentials"
        )
        yield SecuredFleet(layout, broker, cp, key, work)
    finally:
        cp.stop(grace=0)
        broker.kill()
