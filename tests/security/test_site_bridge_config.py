"""`edgectl broker config --bridge-to` writes a site broker that mosquitto runs as written: its
bridge logs in to the central broker with the identity provisioned there and maps each device
topic one way only."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.broker import broker_user
from edgectl.mqtt.wire import DeviceTopics, agent_client_id, site_bridge_topic
from edgectl.ports import free_port, wait_for_port
from edgectl.security.bridge import central_admin
from edgectl.security.broker_files import BrokerLayout, write_broker_files
from edgectl.security.dynsec import DynsecAdmin
from tests.conftest import require_mosquitto, start_secured_broker
from tests.harness.mqtt import MqttTestClient

EDGECTL = Path(sys.executable).parent / "edgectl"


@pytest.fixture
def center(tmp_path: Path) -> Iterator[BrokerLayout]:
    layout, broker = start_secured_broker(tmp_path / "center", tmp_path / "center-data")
    try:
        yield layout
    finally:
        broker.kill()


def _client(
    ca: Path, port: int, username: str, password: str, client_id: str | None = None
) -> MqttTestClient:
    client = MqttTestClient(
        "127.0.0.1", port, client_id, username=username, password=password, tls_ca=str(ca)
    )
    assert not client.connect(timeout=10).is_failure, f"{username} could not log in on :{port}"
    return client


@pytest.fixture
def install() -> Iterator[Path]:
    """A directory the broker's own user can reach (removed afterwards, whatever happens)."""
    path = Path(tempfile.mkdtemp(prefix="edgectl-site-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_generated_site_broker_bridges_each_topic_one_way(
    tmp_path: Path, center: BrokerLayout, install: Path
) -> None:
    # Installed where the broker's own user reaches it (pytest's tmp dirs are 0700 root when run as
    # root), and owned by that user, as an installer does; `broker config` writes absolute paths.
    site_dir, site_port = install / "site", free_port()
    site_dir.mkdir()
    for name in ("ca.crt", "ca.key"):  # the documented step: the site's certificate from the fleet CA
        shutil.copy2(center.directory / name, site_dir / name)
    done = subprocess.run(
        [str(EDGECTL), "broker", "config", "--out", str(site_dir), "--hostname", "127.0.0.1",
         "--listen", f"127.0.0.1:{site_port}", "--bridge-to", f"mqtts://127.0.0.1:{center.port}",
         "--site", "site-c", "--central-admin", str(center.credentials_file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bridge_file = site_dir / "conf.d" / "bridge-site-c.conf"
    assert stat.S_IMODE(bridge_file.stat().st_mode) == 0o600
    password = next(
        line.split()[1] for line in bridge_file.read_text().splitlines() if line.startswith("remote_password")
    )
    assert password not in done.stdout + done.stderr

    site_creds = json.loads((site_dir / "control-plane-credentials.json").read_text())
    user = broker_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in [site_dir, *site_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    binary = require_mosquitto()
    log = (tmp_path / "site.log").open("wb")
    site = subprocess.Popen(
        [str(binary), "-c", str(site_dir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    clients: list[MqttTestClient] = []
    try:
        assert wait_for_port("127.0.0.1", site_port, 10), (tmp_path / "site.log").read_text()
        cp_center = _client(
            center.ca_cert, center.port, center.control_plane_username, center.control_plane_password
        )
        clients.append(cp_center)
        cp_center.subscribe(site_bridge_topic("site-c"))
        assert cp_center.expect(15).payload == b"1", "the bridge did not log in to the central broker"
        cp_center.subscribe("edgectl/v1/devices/+/reported")

        # One device, known to both brokers (enrollment provisions it; here the admin API does).
        with central_admin(center.credentials_file) as admin:
            at_center = admin.provision_device("dev-1")
        cp_site = _client(site_dir / "ca.crt", site_port, site_creds["username"], site_creds["password"])
        clients.append(cp_site)
        at_site = DynsecAdmin(cp_site.client).provision_device("dev-1", password=at_center.password)
        device = _client(site_dir / "ca.crt", site_port, "dev-1", at_site.password, agent_client_id("dev-1"))
        clients.append(device)
        topics = DeviceTopics("dev-1")
        device.subscribe(topics.desired)

        device.publish(topics.reported, b'{"deviceId": "dev-1"}')  # out: site -> center
        got = cp_center.expect(10)
        assert got.topic == topics.reported and b"dev-1" in got.payload
        cp_center.publish(topics.desired, b'{"generation": 1}', retain=True)  # in: center -> site
        got = device.expect(10)
        assert got.topic == topics.desired and b"generation" in got.payload

        # Not the other way: desired state written at the site never reaches the center.
        center_device = _client(
            center.ca_cert, center.port, "dev-1", at_center.password, agent_client_id("dev-1")
        )
        clients.append(center_device)
        center_device.subscribe(topics.desired)
        assert center_device.expect(5).retain  # the center's own retained desired (positive control)
        cp_site.publish(topics.desired, b'{"generation": 666}')
        assert device.expect(5).payload == b'{"generation": 666}'  # the site broker delivered it locally
        assert center_device.nothing_arrives(2.0), "desired state crossed the bridge from the site"
    finally:
        for c in clients:
            c.close()
        site.kill()
        site.wait(10)
        log.close()
    # Refreshing the site's config (new hostnames, say) keeps it a site broker.
    again = subprocess.run(
        [str(EDGECTL), "broker", "config", "--out", str(site_dir), "--hostname", "site.lan", "--listen", f"127.0.0.1:{site_port}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"include_dir {site_dir / 'conf.d'}" in (site_dir / "mosquitto.conf").read_text()


def test_bridge_to_needs_a_site_and_the_central_admin(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(EDGECTL), "broker", "config", "--out", str(tmp_path / "s"), "--bridge-to", "mqtts://center:8883"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "--site" in done.stderr and "--central-admin" in done.stderr
    assert not (tmp_path / "s").exists(), "nothing is written before the arguments are checked"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "site-a"], "need --bridge-to"),
        (["--central-admin", "center/control-plane-credentials.json"], "need --bridge-to"),
        (["--bridge-to", "http://center", "--site", "a", "--central-admin", "c.json"], "not an MQTT URL"),
        (["--bridge-to", "mqtts://center:8883", "--site", "a", "--central-admin", "c.json"], "is not a file"),
    ],
)
def test_site_options_are_checked_before_anything_is_written(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(EDGECTL), "broker", "config", "--out", str(tmp_path / "s"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("scheme", ["mqtts", "mqtt"])
def test_an_unreachable_central_broker_leaves_nothing_written(scheme: str, tmp_path: Path) -> None:
    """The site's files were written before the central broker was called, and an unreachable one
    then failed the command (exit 1) with a half-made site broker left behind."""
    require_mosquitto()  # the central broker's files name its plugin
    center = write_broker_files(
        tmp_path / "center", hostnames=["127.0.0.1"], host="127.0.0.1", port=free_port()
    )
    nobody = free_port()  # nothing listens there
    site_dir = tmp_path / "s"
    done = subprocess.run(
        [str(EDGECTL), "broker", "config", "--out", str(site_dir), "--hostname", "127.0.0.1",
         "--listen", f"127.0.0.1:{free_port()}", "--bridge-to", f"{scheme}://127.0.0.1:{nobody}",
         "--site", "site-d", "--central-admin", str(center.credentials_file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    message = " ".join(done.stderr.split())
    assert done.returncode == 9, done.stderr  # unreachable: try again later (docs/cli.md)
    assert f"cannot reach the central broker at {scheme}://127.0.0.1:{nobody}" in message, message
    assert "run the same command again" in message
    assert not site_dir.exists(), sorted(p.name for p in site_dir.rglob("*"))


def test_a_refused_central_login_leaves_nothing_written(tmp_path: Path, center: BrokerLayout) -> None:
    wrong = tmp_path / "wrong" / "control-plane-credentials.json"
    wrong.parent.mkdir()
    creds = json.loads(center.credentials_file.read_text())
    wrong.write_text(json.dumps({**creds, "password": "not-the-password"}))
    shutil.copy2(center.ca_cert, wrong.parent / "ca.crt")
    site_dir = tmp_path / "s"
    done = subprocess.run(
        [str(EDGECTL), "broker", "config", "--out", str(site_dir), "--hostname", "127.0.0.1",
         "--listen", f"127.0.0.1:{free_port()}", "--bridge-to", f"mqtts://127.0.0.1:{center.port}",
         "--site", "site-e", "--central-admin", str(wrong)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 8, done.stderr
    assert "refused the admin login" in done.stderr and "control-plane-credentials.json" in done.stderr
    assert not site_dir.exists()
