"""Security v2, broker rows: attacks on a real mosquitto running the config edgectl generates.

Row 1: a device's login taking over another device's client id (its session, subscriptions and
desired state); row 8: a device id that names a service login; row 12: oversized packets and a
broker that keeps root. Each attack is performed for real and has a positive control.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from edgectl.broker import broker_user
from edgectl.mqtt.wire import MAX_PAYLOAD_BYTES, DeviceTopics, agent_client_id
from edgectl.ports import free_port, wait_for_port
from edgectl.security.broker_files import write_broker_files
from edgectl.security.dynsec import DynsecAdmin, device_role_name
from edgectl.security.errors import SecurityError
from tests.conftest import require_mosquitto
from tests.harness.mqtt import MqttTestClient
from tests.security.test_broker_acl import NOT_AUTHORIZED, SecureFleet, fleet

__all__ = ["fleet"]


def _agent(fleet: SecureFleet, username: str, password: str, client_id: str) -> MqttTestClient:
    return MqttTestClient("127.0.0.1", fleet.layout.port, client_id, username=username, password=password,
                          tls_ca=str(fleet.layout.ca_cert))  # fmt: skip


def test_a_device_login_cannot_take_over_another_devices_client_id(fleet: SecureFleet) -> None:
    a, b = fleet.admin.provision_device("dev-a"), fleet.admin.provision_device("dev-b")
    tb = DeviceTopics("dev-b")
    victim = _agent(fleet, b.username, b.password, agent_client_id("dev-b"))
    assert not victim.connect(timeout=15, clean_start=False).is_failure  # positive control: B's own id
    assert [r.value for r in victim.subscribe(tb.desired, timeout=15)] == [1]

    # The attack: A's credentials with B's client id, asking for B's stored session.
    thief = _agent(fleet, a.username, a.password, agent_client_id("dev-b"))
    assert thief.connect(timeout=15, clean_start=False).is_failure
    thief.close()
    any_id = _agent(fleet, a.username, a.password, "whatever-i-like")
    assert any_id.connect(timeout=15).is_failure  # a login is pinned to its one client id
    any_id.close()

    fleet.control_plane.publish(tb.desired, b'{"generation": "7"}', retain=True)
    assert victim.expect(15).payload == b'{"generation": "7"}'  # B stayed connected and got it
    assert victim.disconnected.empty()

    # Receiving is explicit too: even a subscription granted by mistake delivers nothing foreign.
    fleet.admin.run("addRoleACL", rolename=device_role_name("dev-a"), acltype="subscribeLiteral",
                    topic=tb.desired, priority=0, allow=True)  # fmt: skip
    own = _agent(fleet, a.username, a.password, agent_client_id("dev-a"))
    assert not own.connect(timeout=15, clean_start=False).is_failure  # positive control: A's own id
    assert [r.value for r in own.subscribe(tb.desired, timeout=15)] == [1]
    fleet.control_plane.publish(tb.desired, b'{"generation": "8"}', retain=True)
    assert victim.expect(15).payload == b'{"generation": "8"}'
    assert own.nothing_arrives(1.0)
    assert [r.value for r in own.subscribe("edgectl/v1/devices/+/desired", timeout=15)] == [NOT_AUTHORIZED]
    for c in (own, victim):
        c.close()


def test_a_device_id_cannot_name_a_service_login(fleet: SecureFleet) -> None:
    for reserved in (fleet.layout.control_plane_username, "edgectl-anything", "EDGECTL-Control-Plane"):
        with pytest.raises(SecurityError, match="reserved"):
            fleet.admin.provision_device(reserved)
        with pytest.raises(SecurityError, match="reserved"):
            fleet.admin.remove_device(reserved)
    # The control plane's own login still works, and a device id that only contains the word is fine.
    cp = MqttTestClient("127.0.0.1", fleet.layout.port, username=fleet.layout.control_plane_username,
                        password=fleet.layout.control_plane_password, tls_ca=str(fleet.layout.ca_cert))  # fmt: skip
    assert not cp.connect(timeout=15).is_failure
    assert DynsecAdmin(cp.client).run("listClients")
    cp.close()
    ok = fleet.admin.provision_device("cam-edgectl-1")
    device = _agent(fleet, ok.username, ok.password, agent_client_id("cam-edgectl-1"))
    assert not device.connect(timeout=15).is_failure
    device.close()


def test_oversized_packets_are_refused_and_the_broker_does_not_keep_root(fleet: SecureFleet) -> None:
    conf = fleet.broker.config_path.read_text()
    assert f"max_packet_size {MAX_PAYLOAD_BYTES}" in conf
    assert "user root" not in conf and "user root" not in fleet.layout.config_file.read_text()
    status = Path(f"/proc/{fleet.broker.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])
    if os.geteuid() == 0:  # started as root: it runs as an unprivileged user, never root
        assert (
            uid != 0 and f"user {broker_user()}" in conf and pwd.getpwnam(broker_user() or "").pw_uid == uid
        )
    else:
        assert uid == os.geteuid()

    a = fleet.admin.provision_device("dev-big")
    t = DeviceTopics("dev-big")
    watcher = fleet.control_plane
    watcher.subscribe(t.events, timeout=15)
    device = _agent(fleet, a.username, a.password, agent_client_id("dev-big"))
    assert not device.connect(timeout=15).is_failure
    device.publish(t.events, b"x" * (1 << 20))  # positive control: 1 MiB passes
    assert len(watcher.expect(15).payload) == 1 << 20
    info = device.client.publish(t.events, b"x" * (5 << 20), qos=1)
    device.disconnected.get(timeout=15)  # the broker hangs up on a 5 MiB packet
    assert not info.is_published()
    assert watcher.nothing_arrives(1.0)
    device.close()


def test_the_standalone_config_runs_unprivileged_and_keeps_enrolled_devices() -> None:
    """`edgectl broker config` as root, then `mosquitto -c` as the operator would: not root, and it works."""
    binary = require_mosquitto()
    base = Path(tempfile.mkdtemp(prefix="edgectl-standalone-"))
    base.chmod(0o755)  # an operator's /etc/mosquitto/edgectl: a path the broker's user can walk
    try:
        layout = write_broker_files(
            base / "fleet", hostnames=["127.0.0.1"], host="127.0.0.1", port=free_port()
        )
        conf = layout.config_file.read_text()
        assert "user root" not in conf
        proc = subprocess.Popen([str(binary), "-c", str(layout.config_file)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            assert wait_for_port("127.0.0.1", layout.port, 15)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])
            assert (uid != 0) if os.geteuid() == 0 else (uid == os.geteuid())
            cp = MqttTestClient("127.0.0.1", layout.port, username=layout.control_plane_username,
                                password=layout.control_plane_password, tls_ca=str(layout.ca_cert))  # fmt: skip
            assert not cp.connect(timeout=15).is_failure
            DynsecAdmin(cp.client).provision_device("dev-standalone")
            cp.close()
        finally:
            proc.terminate()
            proc.wait(10)
        users = [c["username"] for c in json.loads(layout.dynsec_file.read_text())["clients"]]
        assert "dev-standalone" in users  # the unprivileged broker saved what it was told
    finally:
        shutil.rmtree(base, ignore_errors=True)
