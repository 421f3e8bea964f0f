"""A real mosquitto running the config `edgectl broker config` generates enforces device identities.

Each test starts its own broker with TLS, anonymous access off and the dynamic-security plugin,
provisions devices through the plugin's API as the control plane does, then attacks it.
"""

from __future__ import annotations

import json
import queue
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgectl.broker import MosquittoProcess
from edgectl.mqtt.wire import DeviceTopics, agent_client_id
from edgectl.security.broker_files import BrokerLayout, write_broker_files
from edgectl.security.dynsec import DeviceIdentity, DynsecAdmin
from tests.conftest import start_secured_broker
from tests.harness.mqtt import MqttTestClient

NOT_AUTHORIZED = 0x87


@dataclass
class SecureFleet:
    layout: BrokerLayout
    broker: MosquittoProcess
    control_plane: MqttTestClient
    admin: DynsecAdmin

    def client(self, identity: DeviceIdentity | None = None, **kwargs: str) -> MqttTestClient:
        creds = {"username": identity.username, "password": identity.password} if identity else kwargs
        return MqttTestClient(
            "127.0.0.1",
            self.layout.port,
            agent_client_id(identity.device_id) if identity else None,  # a device's login is pinned to it
            tls_ca=str(self.layout.ca_cert),
            **creds,  # type: ignore[arg-type]
        )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SecureFleet]:
    layout, broker = start_secured_broker(tmp_path / "broker", hostnames=("localhost", "127.0.0.1"))
    cp = MqttTestClient("127.0.0.1", layout.port, username=layout.control_plane_username,
                        password=layout.control_plane_password, tls_ca=str(layout.ca_cert))  # fmt: skip
    assert not cp.connect(timeout=15).is_failure
    try:
        yield SecureFleet(layout, broker, cp, DynsecAdmin(cp.client))
    finally:
        cp.close()
        broker.kill()


def _granted(reasons: list) -> list[int]:  # type: ignore[type-arg]
    return [r.value for r in reasons]


def test_generated_files_keep_secrets_private(fleet: SecureFleet) -> None:
    for secret in (fleet.layout.credentials_file, fleet.layout.server_key, fleet.layout.directory / "ca.key",
                   fleet.layout.dynsec_file):  # fmt: skip
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    conf = fleet.layout.config_file.read_text()
    assert "allow_anonymous false" in conf and "plugin " in conf and "certfile" in conf
    assert fleet.layout.control_plane_password not in fleet.layout.dynsec_file.read_text()  # stored hashed


def test_device_is_confined_to_its_own_subtree(fleet: SecureFleet) -> None:
    a, b = fleet.admin.provision_device("dev-a"), fleet.admin.provision_device("dev-b")
    ta, tb = DeviceTopics("dev-a"), DeviceTopics("dev-b")
    device_a = fleet.client(a)
    assert not device_a.connect(timeout=15).is_failure

    assert _granted(device_a.subscribe(ta.desired, timeout=15)) == [1]
    assert _granted(device_a.subscribe(tb.desired, timeout=15)) == [NOT_AUTHORIZED]
    assert _granted(device_a.subscribe("#", timeout=15)) == [NOT_AUTHORIZED]
    assert _granted(device_a.subscribe("edgectl/v1/devices/+/desired", timeout=15)) == [NOT_AUTHORIZED]

    watcher = fleet.control_plane
    assert _granted(watcher.subscribe("edgectl/v1/devices/+/reported", timeout=15)) == [1]
    device_a.publish(tb.reported, b"forged")  # as another device: dropped
    device_a.publish(ta.reported, b"mine")
    got = watcher.expect(15)
    assert (got.topic, got.payload) == (ta.reported, b"mine")
    assert watcher.nothing_arrives(0.5)

    # Only the control plane writes desired state: a device's own desired topic is read-only.
    device_b = fleet.client(b)
    device_b.connect(timeout=15)
    device_b.subscribe(tb.desired, timeout=15)
    device_b.publish(tb.desired, b"self-promotion", retain=True)
    device_a.publish(tb.desired, b"hijack", retain=True)
    assert device_b.nothing_arrives(0.5)
    watcher.publish(tb.desired, b'{"generation": "1"}', retain=True)
    assert device_b.expect(15).payload == b'{"generation": "1"}'
    device_a.close()
    device_b.close()


def test_anonymous_wrong_password_and_plaintext_are_refused(fleet: SecureFleet) -> None:
    fleet.admin.provision_device("dev-c")
    anonymous = fleet.client()
    assert anonymous.connect(timeout=15).is_failure
    wrong = fleet.client(username="dev-c", password="not-the-password")
    assert wrong.connect(timeout=15).is_failure
    plaintext = MqttTestClient("127.0.0.1", fleet.layout.port, username="dev-c", password="x")
    with pytest.raises((queue.Empty, OSError, ConnectionError)):
        plaintext.connect(timeout=2)  # a TLS listener never answers a plaintext CONNECT
    for c in (anonymous, wrong):
        c.close()


def test_revoked_device_is_dropped_and_cannot_reconnect(fleet: SecureFleet) -> None:
    identity = fleet.admin.provision_device("dev-r")
    device = fleet.client(identity)
    assert not device.connect(timeout=15).is_failure
    fleet.admin.disable_device("dev-r")
    device.disconnected.get(timeout=5)  # kicked at once
    device.close()
    again = fleet.client(identity)
    assert again.connect(timeout=15).is_failure
    again.close()

    fleet.admin.remove_device("dev-r")
    fleet.admin.remove_device("dev-r")  # idempotent
    gone = fleet.client(identity)
    assert gone.connect(timeout=15).is_failure
    gone.close()


def test_identities_survive_a_broker_restart_and_re_enrollment_rotates_the_password(
    fleet: SecureFleet,
) -> None:
    old = fleet.admin.provision_device("dev-p")
    fleet.control_plane.close()
    fleet.broker.restart()
    device = fleet.client(old)
    assert not device.connect(timeout=15).is_failure
    device.close()

    cp = fleet.client(
        username=fleet.layout.control_plane_username, password=fleet.layout.control_plane_password
    )
    cp.connect(timeout=15)
    new = DynsecAdmin(cp.client).provision_device("dev-p")
    assert new.password != old.password
    assert fleet.client(old).connect(timeout=15).is_failure
    assert not fleet.client(new).connect(timeout=15).is_failure
    cp.close()


def test_rewriting_the_config_keeps_the_ca_and_the_enrolled_devices(fleet: SecureFleet) -> None:
    fleet.admin.provision_device("dev-k")
    ca_before = fleet.layout.ca_cert.read_bytes()
    again = write_broker_files(fleet.layout.directory, hostnames=["localhost", "127.0.0.1"],
                               host="127.0.0.1", port=fleet.layout.port)  # fmt: skip
    assert again.ca_cert.read_bytes() == ca_before
    assert again.control_plane_password == fleet.layout.control_plane_password
    users = [c["username"] for c in json.loads(again.dynsec_file.read_text())["clients"]]
    assert "dev-k" in users


def test_broker_config_command_writes_a_layout_and_refuses_bad_input(tmp_path: Path) -> None:
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "edgectl", "broker", "config", "--out", str(tmp_path / "b"), "--json",
                         "--listen", "127.0.0.1:8883"], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["url"] == "mqtts://127.0.0.1:8883"
    password = json.loads((tmp_path / "b" / "control-plane-credentials.json").read_text())["password"]
    assert password not in ok.stdout  # secrets never in --json output
    bad = subprocess.run([sys.executable, "-m", "edgectl", "broker", "config", "--out", str(tmp_path / "c"),
                          "--listen", "nonsense"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "invalid --listen" in bad.stderr and "Traceback" not in bad.stderr
