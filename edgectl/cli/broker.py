"""`edgectl broker config`: generate a mosquitto setup that enforces the fleet's identities."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgectl.addresses import parse_host_port
from edgectl.cli.output import console, print_json
from edgectl.errors import UsageError
from edgectl.security.broker_files import find_dynsec_plugin, write_broker_files

app = typer.Typer(help="Generate mosquitto configuration for a fleet.")


@app.command("config")
def broker_config(
    out: Path = typer.Option(Path("mosquitto"), "--out", help="output directory (kept files are reused)"),
    hostname: list[str] = typer.Option(
        ["localhost", "127.0.0.1"],
        "--hostname",
        help="names and IPs devices use to reach the broker (repeat)",
    ),
    listen: str = typer.Option("0.0.0.0:8883", help="listener HOST:PORT"),
    no_tls: bool = typer.Option(False, "--no-tls", help="plain MQTT (only behind another TLS terminator)"),
    plugin: Path | None = typer.Option(None, help="path of mosquitto_dynamic_security.so (found by default)"),
    json_out: bool = typer.Option(False, "--json", help="print the file layout as JSON (no secrets)"),
    bridge_to: str | None = typer.Option(
        None, "--bridge-to", help="make this a site broker bridged to the central broker at this URL"
    ),
    site: str | None = typer.Option(
        None, help="the site's name (with --bridge-to); devices there carry site=NAME"
    ),
    central_admin: Path | None = typer.Option(
        None,
        help="the central broker's control-plane-credentials.json: provisions the bridge's identity there",
    ),
    bridge_ca: Path | None = typer.Option(
        None,
        help="CA that signed the central broker's certificate [default: the ca.crt beside --central-admin]",
    ),
) -> None:
    """Write a mosquitto config with TLS, per-device identities and ACLs.

    Devices are confined to edgectl/v1/devices/{their id}/# and the control plane is the only
    writer of desired state. Device identities are added at enrollment, with no restart.

    With --bridge-to it is a site broker: its devices keep serving through an uplink outage, and
    a bridge relays their topics to the central broker under an identity provisioned there.

    Example: edgectl broker config --out /etc/mosquitto/edgectl --hostname broker.lab --listen 0.0.0.0:8883
    Site: edgectl broker config --out site-a --bridge-to mqtts://mqtt.example.com:8883 --site site-a --central-admin center/control-plane-credentials.json
    """
    if bridge_to and not (site and central_admin):
        raise UsageError("--bridge-to needs --site NAME and --central-admin FILE",
                         hint="FILE: control-plane-credentials.json of the central broker's config")  # fmt: skip
    if not bridge_to and (site or central_admin or bridge_ca):
        # Without --bridge-to they would be dropped and a plain broker written as if all went well.
        raise UsageError(
            "--site, --central-admin and --bridge-ca make a site broker: they need --bridge-to URL",
            hint="e.g. --bridge-to mqtts://mqtt.example.com:8883 --site site-a --central-admin FILE",
        )
    if bridge_to:
        from edgectl.addresses import parse_mqtt_url

        parse_mqtt_url(bridge_to)  # a wrong URL is refused before anything is written
        if central_admin and not central_admin.is_file():
            raise UsageError(
                f"--central-admin {central_admin} is not a file",
                hint="pass the control-plane-credentials.json that `edgectl broker config` wrote for the central broker",
            )
    listen_at = parse_host_port(listen, what="--listen", default_host="0.0.0.0")
    plugin = plugin or find_dynsec_plugin()
    from edgectl.security.bridge import (
        BRIDGE_CONF_DIR,
        include_bridges,
        prepare_site_bridge,
        write_site_bridge,
    )

    # Everything that can fail without writing (the central broker's CA, reaching it, provisioning
    # the bridge's identity there) comes first: a failure leaves no half-made site broker behind.
    bridge = (
        prepare_site_bridge(site, bridge_to, central_admin, bridge_ca)
        if bridge_to and site and central_admin
        else None
    )
    layout = write_broker_files(
        out.resolve(),
        hostnames=hostname,
        host=listen_at.host,
        port=listen_at.port,
        tls=not no_tls,
        plugin=plugin,
    )
    if bridge is not None:
        bridge_file = write_site_bridge(layout, bridge, hostname[0])

    if (layout.directory / BRIDGE_CONF_DIR).is_dir():  # a site broker stays one when its config is refreshed
        include_bridges(layout)
    files = {
        "mosquitto.conf": layout.config_file,
        "dynamic security": layout.dynsec_file,
        "control plane credentials (0600)": layout.credentials_file,
        "fleet CA": layout.ca_cert,
    }
    if bridge_to:
        files["bridge to the central broker (0600)"] = bridge_file
    if json_out:
        print_json({"url": layout.url, "files": {k: str(v) for k, v in files.items()}})
        return
    table = Table(title=f"broker config for {layout.url}")
    table.add_column("file")
    table.add_column("path")
    for name, path in files.items():
        table.add_row(name, str(path))
    console.print(table)
    console.print(f"run it with: mosquitto -c {layout.config_file}")
