"""A secured `edgectl up --detach` fleet for end-to-end tests, trusting a fresh signing key."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from edgectl.agent.enroll import make_key_and_csr
from edgectl.artifact import SigningKey, public_pem
from edgectl.client import ControlPlaneClient
from edgectl.endpoints import Endpoints, LocalFleetError
from edgectl.localfleet import stop_detached
from edgectl.mqtt.wire import agent_client_id
from edgectl.protos.v1 import common_pb2, fleet_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.conftest import require_mosquitto
from tests.harness.mqtt import MqttTestClient


def edgectl(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "edgectl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)  # fmt: skip


def fleet_env(tmp_path: Path, data: Path) -> dict[str, str]:
    """The environment of CLI calls against the fleet in ``data``."""
    return {**os.environ, "EDGECTL_CONFIG_DIR": str(tmp_path / "config"), "EDGECTL_DATA_DIR": str(data)}


@contextlib.contextmanager
def up_fleet(tmp_path: Path, agents: int = 2, heartbeat_s: float = 0) -> Iterator[tuple[Path, SigningKey]]:
    """(data dir, the key the fleet trusts); everything is stopped afterwards.

    ``heartbeat_s`` > 0: every agent reports that often (an agent config file the env names)."""
    require_mosquitto()
    key = SigningKey.generate()
    pub = tmp_path / "test.pub.pem"
    pub.write_bytes(public_pem(key.public_key))
    data = tmp_path / "fleet"
    env = fleet_env(tmp_path, data)
    if heartbeat_s > 0:
        (tmp_path / "agent.yaml").write_text(f"heartbeat_s: {heartbeat_s}\n")
        env["EDGECTL_AGENT_CONFIG"] = str(tmp_path / "agent.yaml")
    up = edgectl("up", "--detach", "--agents", str(agents), "--data-dir", str(data), "--trust", str(pub),
                 env=env)  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        yield data, key
    finally:
        with contextlib.suppress(LocalFleetError):
            stop_detached(data, grace_s=5)


def start_rollout(client: ControlPlaneClient, digest: str, labels: dict[str, str], soak_s: int = 0) -> str:
    """Create a rollout in two waves (one device, then the rest); returns its id."""
    created = client.call(client.rollouts.Create, RP.CreateRolloutRequest(
        artifact=digest, selector=common_pb2.Selector(match_labels=labels),
        strategy=RP.Strategy(waves=["1", "100%"], health_timeout_seconds=90, soak_seconds=soak_s),
    ))  # fmt: skip
    return created.id


def wait_rollout(client: ControlPlaneClient, rollout_id: str, timeout: float = 150) -> RP.Rollout:
    """The rollout once it left the active states."""
    deadline = time.monotonic() + timeout
    active = (RP.ROLLOUT_STATE_PENDING, RP.ROLLOUT_STATE_RUNNING, RP.ROLLOUT_STATE_ROLLING_BACK)
    while True:
        r = client.call(client.rollouts.Get, RP.GetRolloutRequest(id=rollout_id))
        if r.state not in active or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def enroll_rogue(client: ControlPlaneClient, endpoints: Endpoints, device_id: str) -> MqttTestClient:
    """A device that enrolls legitimately (admin ``client``) and then speaks MQTT as the test says:
    the compromised device of attack tests. Returned connected, as that device, to the fleet's broker."""
    token = client.call(client.fleet.CreateEnrollmentToken,
                        fleet_pb2.CreateEnrollmentTokenRequest(device_id=device_id)).token  # fmt: skip
    _key, csr = make_key_and_csr(device_id)
    creds = client.call(
        client.fleet.Enroll, fleet_pb2.EnrollRequest(device_id=device_id, token=token, csr_pem=csr)
    )
    host, port = endpoints.mqtt.rsplit("//", 1)[-1].rsplit(":", 1)
    mqtt = MqttTestClient(host, int(port), agent_client_id(device_id), username=creds.mqtt_username,
                          password=creds.mqtt_password, tls_ca=endpoints.ca)  # fmt: skip
    assert not mqtt.connect().is_failure
    return mqtt
