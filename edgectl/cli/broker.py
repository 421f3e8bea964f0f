"""`edgectl broker config`: generate a mosquitto setup that enforces the fleet's identities."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgectl.addresses import parse_host_port
from edgectl.cli.output import console, print_json
from edgectl.security.broker_files import write_broker_files

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
) -> None:
    """Write a mosquitto config with TLS, per-device identities and ACLs.

    Devices are confined to edgectl/v1/devices/{their id}/# and the control plane is the only
    writer of desired state. Device identities are added at enrollment, with no restart.

    Example: edgectl broker config --out /etc/mosquitto/edgectl --hostname broker.lab --listen 0.0.0.0:8883
    """
    listen_at = parse_host_port(listen, what="--listen", default_host="0.0.0.0")
    layout = write_broker_files(
        out.resolve(),
        hostnames=hostname,
        host=listen_at.host,
        port=listen_at.port,
        tls=not no_tls,
        plugin=plugin,
    )
    files = {
        "mosquitto.conf": layout.config_file,
        "dynamic security": layout.dynsec_file,
        "control plane credentials (0600)": layout.credentials_file,
        "fleet CA": layout.ca_cert,
    }
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
