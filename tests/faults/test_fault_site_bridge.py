"""A site broker bridged to the central broker, and its uplink partitioned.

Two real mosquittos: the central one as `edgectl broker config` makes it (TLS, dynamic security),
with a secured control plane on it; a site broker whose bridge logs in to the center with the
identity `provision_bridge` made there, through a TCP proxy the test cuts and heals. The agents
are real agents connected to the site broker only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.addresses import parse_mqtt_url
from edgectl.agent.config import CREDENTIALS_FILE
from edgectl.artifact import SigningKey, TrustStore
from edgectl.broker import BrokerConfig, MosquittoProcess
from edgectl.mqtt.wire import DeviceTopics, agent_client_id, decode, site_bridge_topic
from edgectl.ports import free_port
from edgectl.protos.v1 import fleet_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.bridge import central_admin, provision_bridge, render_bridge
from edgectl.security.broker_files import BrokerLayout, write_broker_files
from edgectl.sim import make_devices
from tests.conftest import require_mosquitto, start_secured_broker
from tests.faults.conftest import LABELS, MODEL, Artifacts, assert_fleet_verified, ids_of
from tests.faults.proxy import TcpProxy
from tests.harness.fleet import FleetRig, wait_for
from tests.harness.mqtt import MqttTestClient

SITE = "site-a"
SITE_LABELS = {**LABELS, "site": SITE}


@dataclasses.dataclass
class BridgedSite:
    layout: BrokerLayout
    center: MosquittoProcess
    site: MosquittoProcess
    uplink: TcpProxy


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[BridgedSite]:
    binary = require_mosquitto()
    layout, center = start_secured_broker(tmp_path / "center", tmp_path / "center-data")
    uplink = TcpProxy("127.0.0.1", layout.port)
    with central_admin(layout.credentials_file) as admin:
        identity = provision_bridge(admin, SITE)
    bridge = render_bridge(SITE, parse_mqtt_url(f"mqtts://127.0.0.1:{uplink.port}"), identity, layout.ca_cert)
    # The site's device listener: devices on the site's LAN (its own device authentication is out of
    # this test's scope; the bridge's login to the center is not).
    site = MosquittoProcess(
        BrokerConfig(data_dir=tmp_path / "site-data", extra_lines=bridge.splitlines()), binary=binary
    )
    site.start()
    try:
        yield BridgedSite(layout, center, site, uplink)
    finally:
        site.kill()
        uplink.close()
        center.kill()


def _site_reports(site: MosquittoProcess, ids: list[str], within: float) -> dict[str, mqtt_pb2.ReportedState]:
    """The reports each device publishes to its site broker within ``within`` seconds (fresh, not retained)."""
    watcher = MqttTestClient(site.host, site.port)
    assert not watcher.connect().is_failure
    watcher.subscribe("edgectl/v1/devices/+/reported")
    fresh: dict[str, mqtt_pb2.ReportedState] = {}
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline and set(fresh) != set(ids):
            try:
                msg = watcher.expect(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                break
            if not msg.retain:
                fresh[msg.topic.split("/")[3]] = decode(msg.payload, mqtt_pb2.ReportedState)
    finally:
        watcher.close()
    return fresh


def test_site_partition_devices_keep_serving_center_sees_offline_rollout_converges_after_heal(
    tmp_path: Path, bridged: BridgedSite, signing_key: SigningKey, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: with the site's uplink cut, the agents keep serving their model and reporting to the
    site broker; the central broker publishes the bridge's will, so the control plane marks every
    device of the site offline at once; a rollout created during the partition waits, and after the
    heal the bridge delivers it, the devices converge, report back, and the rollout succeeds with no
    device failed or skipped."""
    rig = FleetRig(tmp_path / "fleet", bridged.center, signing_key, security=bridged.layout)
    try:
        d1, d2 = rig.push(artifacts.good(1)), rig.push(artifacts.good(2))
        devices = [
            dataclasses.replace(d, mqtt=bridged.site.url) for d in make_devices(3, "site", SITE_LABELS)
        ]
        # Unchanged reports every second too, so that the site broker shows each agent still reporting.
        sim = rig.simulate(devices=devices, per_process=3, heartbeat_s=1.0, idle_report_s=1.0)
        ids = ids_of(sim)
        rig.wait_all_online(ids)
        first = rig.rollout(f"{MODEL}:1", SITE_LABELS, ["100%"], health_timeout_s=60)
        assert rig.wait_done(first.id, 120).state == RP.ROLLOUT_STATE_SUCCEEDED
        assert_fleet_verified(rig, sim, trust, d1)

        # The bridge announces its link on the center (retained), as the control plane reads it.
        link = MqttTestClient("127.0.0.1", bridged.layout.port, username=bridged.layout.control_plane_username,
                              password=bridged.layout.control_plane_password, tls_ca=str(bridged.layout.ca_cert))  # fmt: skip
        assert not link.connect().is_failure
        link.subscribe(site_bridge_topic(SITE))
        assert link.expect(10).payload == b"1"

        bridged.uplink.cut()
        assert link.expect(15).payload == b"0"  # the bridge's will, published by the central broker
        wait_for(lambda: not any(rig.devices()[i].online for i in ids), 20, what="the site's devices offline")
        # ...while at the site every agent is connected and keeps serving v1 (fresh reports, smoke test passed).
        reports = _site_reports(bridged.site, ids, within=10)
        assert set(reports) == set(ids), "an agent stopped reporting to its site broker during the partition"
        for state in reports.values():
            (model,) = [m for m in state.models if m.name == MODEL]
            assert model.digest == d1 and model.smoke_test_passed

        pending = rig.rollout(f"{MODEL}:2", SITE_LABELS, ["100%"], health_timeout_s=180)
        time.sleep(3)
        assert rig.get(pending.id).state == RP.ROLLOUT_STATE_RUNNING
        still = _site_reports(bridged.site, ids, within=5)
        assert {m.digest for s in still.values() for m in s.models if m.name == MODEL} == {d1}

        bridged.uplink.heal()
        assert link.expect(60).payload == b"1"  # the bridge is back (it retries every 5 s)
        done = rig.wait_done(pending.id, 120)
        assert done.state == RP.ROLLOUT_STATE_SUCCEEDED, done.reason
        outcome = {d.device_id: d.state for w in done.waves for d in w.devices}
        assert outcome == dict.fromkeys(ids, RP.DEVICE_ROLLOUT_STATE_HEALTHY)
        assert_fleet_verified(rig, sim, trust, d2)
        wait_for(
            lambda: all(rig.devices()[i].online for i in ids), 20, what="the site's devices online again"
        )
        link.close()
    finally:
        rig.close()


def test_bridge_identity_is_confined_on_the_central_broker(bridged: BridgedSite) -> None:
    """Attack: the site's bridge credentials (a site is less trusted than the center) are used to
    write desired state or read reports on the central broker; both are refused, while relaying a
    report up (positive control) is allowed."""
    layout = bridged.layout
    with central_admin(layout.credentials_file) as admin:
        identity = provision_bridge(admin, "site-b")
        victim = admin.provision_device("victim")
    tls = str(layout.ca_cert)
    thief = MqttTestClient(  # with the client id the bridge's login is pinned to
        "127.0.0.1",
        layout.port,
        identity.username,
        username=identity.username,
        password=identity.password,
        tls_ca=tls,
    )
    device = MqttTestClient(
        "127.0.0.1",
        layout.port,
        agent_client_id("victim"),
        username="victim",
        password=victim.password,
        tls_ca=tls,
    )
    center = MqttTestClient("127.0.0.1", layout.port, username=layout.control_plane_username,
                            password=layout.control_plane_password, tls_ca=tls)  # fmt: skip
    for c in (thief, device, center):
        assert not c.connect().is_failure
    topics = DeviceTopics("victim")
    device.subscribe(topics.desired)
    center.subscribe("edgectl/v1/devices/+/reported")
    try:
        granted = thief.subscribe(topics.reported)
        assert granted[0].is_failure, "a bridge may not read what devices report to the center"
        thief.publish(topics.desired, b'{"generation": 99}')
        assert device.nothing_arrives(1.5), "a bridge wrote desired state on the central broker"
        thief.publish(topics.reported, b"{}")  # positive control: relaying reports up is its job
        assert center.expect(5).topic == topics.reported
    finally:
        for c in (thief, device, center):
            c.close()


def test_enrollment_puts_a_site_device_on_its_site_broker(
    tmp_path: Path, signing_key: SigningKey, artifacts: Artifacts, trust: TrustStore
) -> None:
    """Promise: with the site broker known to the control plane (`--site-broker DIR`), a device
    labelled site=NAME gets its broker identity on the site broker as well as the center's, is
    told the site broker's URL at enrollment, and converges through the bridge; decommissioning it
    removes its identity from the site broker too (its next login there is refused)."""
    binary = require_mosquitto()
    center_layout, center = start_secured_broker(tmp_path / "center", tmp_path / "center-data")
    site_dir, site_port = tmp_path / "site-s", free_port()
    site_dir.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(center_layout.directory / name, site_dir / name)  # modes too: ca.key stays 0600
    done = subprocess.run(
        [str(Path(sys.executable).parent / "edgectl"), "broker", "config", "--out", str(site_dir), "--hostname",
         "127.0.0.1", "--listen", f"127.0.0.1:{site_port}", "--bridge-to", f"mqtts://127.0.0.1:{center_layout.port}",
         "--site", "site-s", "--central-admin", str(center_layout.credentials_file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    site_layout = write_broker_files(site_dir, hostnames=["127.0.0.1"], host="127.0.0.1", port=site_port)
    config = site_layout.broker_config(tmp_path / "site-data")  # the bridge inline: staged like the rest
    config.extra_lines += (site_dir / "conf.d" / "bridge-site-s.conf").read_text().splitlines()
    site = MosquittoProcess(config, binary=binary)
    site.start()
    labels = {**LABELS, "site": "site-s"}
    rig: FleetRig | None = None
    try:  # the brokers are stopped even when the control plane fails to start
        rig = FleetRig(
            tmp_path / "fleet", center, signing_key, security=center_layout, site_brokers=[site_dir]
        )
        d1 = rig.push(artifacts.good(1))
        sim = rig.simulate(devices=make_devices(2, "sited", labels), per_process=2)  # URLs from enrollment
        ids = ids_of(sim)
        rig.wait_all_online(ids)
        for device_id in ids:
            creds = json.loads((sim.settings.data_dir(device_id) / CREDENTIALS_FILE).read_text())
            assert creds["mqttUrl"] == f"mqtts://127.0.0.1:{site_port}", creds["mqttUrl"]
        r = rig.rollout(f"{MODEL}:1", labels, ["100%"], health_timeout_s=60)
        assert rig.wait_done(r.id, 120).state == RP.ROLLOUT_STATE_SUCCEEDED
        assert_fleet_verified(rig, sim, trust, d1)
        # remote diagnostics cross the bridge both ways: an answer at all (else UNAVAILABLE after the
        # timeout) means the request reached the site's agent and its lines came back; simulated agents
        # log at WARNING, so the lines themselves may be none
        logs = rig.client.fleet.DeviceLogs(
            fleet_pb2.DeviceLogsRequest(device_id=ids[1], timeout_seconds=15), timeout=40
        )
        assert not logs.truncated and all(line.at > 0 for line in logs.lines)

        gone = ids[0]
        password = json.loads((sim.settings.data_dir(gone) / CREDENTIALS_FILE).read_text())["mqttPassword"]
        sim.stop()
        kept = ids[1]  # positive control: a device's enrollment made its login on the site broker
        kept_password = json.loads((sim.settings.data_dir(kept) / CREDENTIALS_FILE).read_text())[
            "mqttPassword"
        ]
        login = MqttTestClient("127.0.0.1", site_port, agent_client_id(kept), username=kept, password=kept_password,
                               tls_ca=str(site_layout.ca_cert))  # fmt: skip
        assert not login.connect(timeout=10).is_failure
        login.close()
        rig.client.fleet.DecommissionDevice(fleet_pb2.DecommissionDeviceRequest(id=gone), timeout=30)
        for port, ca in ((site_port, site_layout.ca_cert), (center_layout.port, center_layout.ca_cert)):
            login = MqttTestClient("127.0.0.1", port, agent_client_id(gone), username=gone, password=password,
                                   tls_ca=str(ca))  # fmt: skip
            assert login.connect(timeout=10).is_failure, f"the decommissioned device still logs in on :{port}"
            login.close()
    finally:
        if rig is not None:
            rig.close()
        site.kill()
        center.kill()
