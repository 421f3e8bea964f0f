"""Simulated devices on a secured fleet: each enrolls itself and uses its own identities, as any agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.agent.config import CREDENTIALS_FILE
from edgectl.artifact import SigningKey, TrustStore
from edgectl.broker import MosquittoProcess
from edgectl.ports import free_port
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.broker_files import BrokerLayout, write_broker_files
from tests.conftest import require_mosquitto
from tests.faults.conftest import LABELS, Artifacts, assert_fleet_verified, deploy, ids_of
from tests.harness.fleet import FleetRig
from tests.harness.mqtt import MqttTestClient


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[BrokerLayout, MosquittoProcess]]:
    """The broker `edgectl broker config` makes: TLS, no anonymous access, dynamic security."""
    require_mosquitto()
    layout = write_broker_files(tmp_path / "security", hostnames=["localhost", "127.0.0.1"], host="127.0.0.1",
                                port=free_port())  # fmt: skip
    broker = MosquittoProcess(layout.broker_config(tmp_path / "broker"))
    broker.start()
    try:
        yield layout, broker
    finally:
        broker.kill()


def test_simulated_devices_enroll_themselves_on_a_secured_fleet(
    tmp_path: Path,
    secured: tuple[BrokerLayout, MosquittoProcess],
    signing_key: SigningKey,
    artifacts: Artifacts,
    trust: TrustStore,
) -> None:
    """Promise: on a secured fleet a simulated device is enrolled by the agent's own code (its own
    key and CSR, the one-time token over TLS checked against the fleet CA), then reaches the
    broker only with the identity enrollment made for it and fetches over mTLS; the rollout
    converges exactly as on a dev fleet. Anonymous clients are refused by that broker."""
    layout, broker = secured
    rig = FleetRig(tmp_path / "fleet", broker, signing_key, security=layout)
    try:
        stranger = MqttTestClient(broker.host, broker.port, tls_ca=str(layout.ca_cert))
        assert stranger.connect().is_failure, "the secured broker let an anonymous client in"
        stranger.close()
        d1 = rig.push(artifacts.good(1))
        sim = rig.simulate(2, labels=LABELS, per_process=2)
        rig.wait_all_online(ids_of(sim))
        for device_id in ids_of(sim):
            creds = json.loads((sim.settings.data_dir(device_id) / CREDENTIALS_FILE).read_text())
            assert creds["mqttUsername"] == device_id and creds["clientCertPem"], creds.keys()
            assert (sim.settings.data_dir(device_id) / "device.key").stat().st_mode & 0o077 == 0
        assert deploy(rig, 1).state == RP.ROLLOUT_STATE_SUCCEEDED
        assert_fleet_verified(rig, sim, trust, d1)
    finally:
        rig.close()
