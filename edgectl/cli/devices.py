"""`edgectl devices ls|enroll|label|rm`: the fleet's devices.

Thin over :mod:`edgectl.client`: parse flags, make one call, print a table or ``--json``.
A gRPC failure is one line (``not found: device cam-9 does not exist``) and a non-zero exit.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgectl.cli.output import console, err_console, print_json
from edgectl.cli.remote import (
    CaOpt,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    ago,
    connect,
    enum_name,
    message_to_dict,
)
from edgectl.control_plane.strategy import parse_duration
from edgectl.errors import UsageError
from edgectl.labels import format_labels, parse_labels, parse_selector
from edgectl.protos.v1 import common_pb2, fleet_pb2

# -- devices -------------------------------------------------------------------------------------

app = typer.Typer(help="The fleet's devices: ls, enroll, label, rm.")


@app.command("ls")
def devices_ls(
    selector: str | None = typer.Option(None, "--selector", "-l", help="k=v[,k=v] label selector"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List devices with their live state (online, active artifact, health, last seen).

    Example: edgectl devices ls -l site=lab
    """
    sel = parse_selector(selector) if selector else None
    request = fleet_pb2.ListDevicesRequest(
        selector=common_pb2.Selector(match_labels=sel.labels, device_ids=list(sel.device_ids))
        if sel
        else None
    )
    with connect(server, token, ca) as client:
        devices = client.call(client.fleet.ListDevices, request).devices
    if json_out:
        print_json([message_to_dict(d) for d in devices])
        return
    table = Table("id", "online", "active", "desired", "health", "last seen", "labels", "error")
    for d in devices:
        table.add_row(
            d.id, "yes" if d.online else "[red]no[/]",
            f"{d.active.name}:{d.active.version}" if d.active.digest else "-",
            f"{d.desired.name}:{d.desired.version}" if d.desired.digest else "-",
            enum_name(d.health, fleet_pb2.DeviceHealth, "DEVICE_HEALTH_"), ago(d.last_seen),
            format_labels(d.labels), d.last_error,
        )  # fmt: skip
    console.print(table)


@app.command("enroll")
def devices_enroll(
    device_id: str = typer.Argument(..., metavar="ID"),
    labels: str | None = typer.Option(None, help="k=v[,k=v] labels to give the device"),
    ttl: str = typer.Option("1h", help="how long the token stays valid"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Make a one-time enrollment token that an agent exchanges for its credentials.

    Example: edgectl devices enroll cam-07 --labels site=lab,gpu=orin
    """
    request = fleet_pb2.CreateEnrollmentTokenRequest(
        device_id=device_id, labels=parse_labels(labels), ttl_seconds=round(parse_duration(ttl))
    )
    with connect(server, token, ca) as client:
        minted = client.call(client.fleet.CreateEnrollmentToken, request)
    if json_out:
        print_json(message_to_dict(minted))
        return
    console.print(
        f"enrollment token for {minted.device_id} (one use, expires {minted.expires_at.ToJsonString()}):"
    )
    console.print(minted.token, style="bold", highlight=False, soft_wrap=True)
    err_console.print(
        f"on the device: EDGECTL_ENROLL_TOKEN=TOKEN edgectl agent run --device-id {minted.device_id} "
        "--enroll-server CP_HOST:7443 --ca-file ca.crt --control-plane CP_HOST:7444 --data-dir DIR",
        highlight=False,
        soft_wrap=True,
    )


@app.command("label")
def devices_label(
    device_id: str = typer.Argument(..., metavar="ID"),
    labels: list[str] = typer.Argument(..., help="k=v[,k=v] to set, k- to remove"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Set or remove a device's labels.

    Example: edgectl devices label cam-07 ring=canary old-
    """
    to_set: dict[str, str] = {}
    remove: list[str] = []
    for item in labels:
        if item.endswith("-") and "=" not in item:
            remove.append(item[:-1])
        elif "=" in item:
            to_set.update(parse_labels(item))
        else:
            raise UsageError(
                f"label {item!r} is neither k=v nor k-", hint="e.g. ring=canary, or old- to remove"
            )
    with connect(server, token, ca) as client:
        device = client.call(
            client.fleet.LabelDevice, fleet_pb2.LabelDeviceRequest(id=device_id, set=to_set, remove=remove)
        )
    if json_out:
        print_json(message_to_dict(device))
    else:
        console.print(f"{device.id}: {format_labels(device.labels)}")


@app.command("rm")
def devices_rm(
    device_id: str = typer.Argument(..., metavar="ID"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
) -> None:
    """Decommission a device: revoke its credentials and forget it.

    Example: edgectl devices rm cam-07
    """
    with connect(server, token, ca) as client:
        client.call(client.fleet.DecommissionDevice, fleet_pb2.DecommissionDeviceRequest(id=device_id))
    console.print(f"{device_id} decommissioned")
