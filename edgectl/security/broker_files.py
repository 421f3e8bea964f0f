"""`edgectl broker config`: everything a mosquitto needs to enforce the fleet's identities.

Writes, into one directory: the fleet CA (made once, kept), the broker's TLS certificate, a
dynamic-security.json holding the control plane's client and roles, a mosquitto.conf that
loads the plugin behind a TLS listener with anonymous access off, and the control plane's
MQTT credentials (0600). Devices are added at enrollment through the plugin's API.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgectl.addresses import MqttUrl
from edgectl.broker import BrokerConfig, broker_user
from edgectl.security.dynsec import initial_config, new_password, upgrade_config
from edgectl.security.errors import SecurityError
from edgectl.security.files import write_private
from edgectl.security.pki import FleetCA

PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
)
CONTROL_PLANE_USERNAME = "edgectl-control-plane"


def find_dynsec_plugin() -> Path:
    """The dynamic-security plugin that Debian's mosquitto 2.x package ships."""
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    raise SecurityError(
        "mosquitto's dynamic-security plugin was not found",
        hint="install mosquitto 2.x (apt-get install mosquitto) or pass --plugin PATH",
    )


@dataclass(frozen=True)
class BrokerLayout:
    """Where `edgectl broker config` put each file, and the control plane's credentials."""

    directory: Path
    host: str
    port: int
    tls: bool
    plugin: Path
    control_plane_username: str
    control_plane_password: str

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "broker.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "broker.key"

    @property
    def dynsec_file(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def credentials_file(self) -> Path:
        return self.directory / "control-plane-credentials.json"

    @property
    def config_file(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def url(self) -> str:
        """The broker URL clients dial (``mqtts://`` with TLS)."""
        return MqttUrl(self.host, self.port, self.tls).public()

    def broker_config(self, data_dir: Path | None = None) -> BrokerConfig:
        """The BrokerConfig (for MosquittoProcess or a rendered file) that enforces this layout."""
        extra = []
        if self.tls:
            extra += [f"cafile {self.ca_cert}", f"certfile {self.server_cert}", f"keyfile {self.server_key}",
                      "tls_version tlsv1.2"]  # fmt: skip
        extra += [f"plugin {self.plugin}", f"plugin_opt_config_file {self.dynsec_file}"]
        return BrokerConfig(
            data_dir=data_dir or self.directory / "data",
            host=self.host,
            port=self.port,
            allow_anonymous=False,
            extra_lines=extra,
        )


def write_broker_files(
    directory: Path,
    *,
    hostnames: list[str],
    host: str = "0.0.0.0",
    port: int = 8883,
    tls: bool = True,
    plugin: Path | None = None,
) -> BrokerLayout:
    """Write (or refresh) a secured broker configuration; the CA and existing devices are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    layout_plugin = plugin or find_dynsec_plugin()
    ca = FleetCA.load_or_create(directory)
    if tls:
        ca.issue_server(hostnames).write(directory, "broker")
    creds_path = directory / "control-plane-credentials.json"
    dynsec_path = directory / "dynamic-security.json"
    if creds_path.exists() and dynsec_path.exists():
        password = json.loads(creds_path.read_text())["password"]  # keep devices enrolled so far
        existing = json.loads(dynsec_path.read_text())
        if upgrade_config(existing):  # written by an older edgectl: today's ACLs, same identities
            write_private(dynsec_path, json.dumps(existing, indent=2).encode())
    else:
        password = new_password()
        write_private(
            dynsec_path, json.dumps(initial_config(CONTROL_PLANE_USERNAME, password), indent=2).encode()
        )
    layout = BrokerLayout(
        directory=directory,
        host=host,
        port=port,
        tls=tls,
        plugin=layout_plugin,
        control_plane_username=CONTROL_PLANE_USERNAME,
        control_plane_password=password,
    )
    write_private(
        creds_path,
        json.dumps(
            {
                "username": CONTROL_PLANE_USERNAME,
                "password": password,
                "url": layout.url,
                "ca": str(layout.ca_cert) if tls else None,
            },
            indent=2,
        ).encode(),
    )
    layout.broker_config().data_dir.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(layout.broker_config().render())
    _hand_to_broker(layout)
    return layout


def _hand_to_broker(layout: BrokerLayout) -> None:
    """Generated as root, the config runs mosquitto as an unprivileged user: give it its own files.

    Its key, the dynamic-security file it rewrites and its data dir become that user's (still
    0600/0700); the CA key, token key and control-plane credentials stay root's alone.
    """
    user = broker_user()
    if user is None:
        return
    for path in (layout.server_key, layout.dynsec_file, layout.broker_config().data_dir):
        if path.exists():
            shutil.chown(path, user, user)
