"""`edgectl devices ls|get|describe|enroll|label|rm`: the fleet's devices.

Thin over :mod:`edgectl.client`: parse flags, make one call, print a table or ``--json``.
A gRPC failure is one line (``not found: device cam-9 does not exist``) and a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import typer
from rich.table import Table

from edgectl.artifact.live_sketch import DEFAULT_THRESHOLD as DRIFT_ALARM
from edgectl.cli.output import (
    IntervalOpt,
    Output,
    OutputOpt,
    WatchOpt,
    console,
    err_console,
    output_format,
    print_json,
    show,
    watch,
)
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
from edgectl.client import RemoteError
from edgectl.control_plane.strategy import parse_duration
from edgectl.errors import UsageError
from edgectl.labels import format_labels, parse_labels, parse_selector
from edgectl.protos.v1 import common_pb2, fleet_pb2, rollouts_pb2

# -- devices -------------------------------------------------------------------------------------

app = typer.Typer(help="The fleet's devices: ls, get, describe, enroll, label, rm, logs, bundle.")


def _selector_request(selector: str | None) -> fleet_pb2.ListDevicesRequest:
    sel = parse_selector(selector) if selector else None
    return fleet_pb2.ListDevicesRequest(
        selector=common_pb2.Selector(match_labels=sel.labels, device_ids=list(sel.device_ids))
        if sel
        else None
    )


def _drift(d: fleet_pb2.Device) -> str:
    """Each model's latest input drift score (PSI), red from 0.25 (a major shift), "-" for none."""
    if not d.drift:
        return "-"
    return ",".join(
        f"{name}=[red]{v:.2f}[/]" if v >= DRIFT_ALARM else f"{name}={v:.2f}"
        for name, v in sorted(d.drift.items())
    )


def _burst(d: fleet_pb2.Device, fleet_cost: float) -> str:
    """The device's burst cost this period and its share of the listed devices' cost."""
    if not d.burst_cost:
        return "-"
    return f"{d.burst_cost:g} ({100 * d.burst_cost / fleet_cost:.0f}%)"


def _devices_table(devices: list[fleet_pb2.Device], wide: bool) -> Table:
    columns = ["id", "online", "active", "desired", "health", "last seen", "labels", "error"]
    table = Table(*columns, *(("agent", "profile", "enrolled", "drift", "burst cost") if wide else ()))
    fleet_cost = sum(d.burst_cost for d in devices)
    for d in devices:
        row = [
            d.id, "yes" if d.online else "[red]no[/]",
            f"{d.active.name}:{d.active.version}" if d.active.digest else "-",
            f"{d.desired.name}:{d.desired.version}" if d.desired.digest else "-",
            enum_name(d.health, fleet_pb2.DeviceHealth, "DEVICE_HEALTH_"), ago(d.last_seen),
            format_labels(d.labels), d.last_error,
        ]  # fmt: skip
        if wide:
            row += [
                d.agent_version or "-",
                d.profile or "-",
                ago(d.enrolled_at),
                _drift(d),
                _burst(d, fleet_cost),
            ]
        table.add_row(*row)
    return table


@app.command("ls")
def devices_ls(
    selector: str | None = typer.Option(None, "--selector", "-l", help="k=v[,k=v] label selector"),
    output: Output | None = OutputOpt,
    watch_: bool = WatchOpt,
    interval: float = IntervalOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List every device with its live state (online, active artifact, health, last seen); follows
    the server's pages, so a fleet of any size is listed whole.

    Example: edgectl devices ls -l site=lab -o wide --watch
    """
    fmt = output_format(output, json_out)
    with connect(server, token, ca) as client:

        def fetch() -> tuple[Any, Callable[[bool], Table]]:
            devices = client.list_all(client.fleet.ListDevices, _selector_request(selector), "devices")
            return [message_to_dict(d) for d in devices], lambda wide: _devices_table(devices, wide)

        if watch_:
            watch(fmt, fetch, interval)
            return
        data, table = fetch()
    show(fmt, data, table)


@app.command("get")
def devices_get(
    device_id: str = typer.Argument(..., metavar="ID"),
    output: Output | None = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """One device, as a one-row table or as JSON/YAML.

    Example: edgectl devices get cam-07 -o yaml
    """
    with connect(server, token, ca) as client:
        device = client.call(client.fleet.GetDevice, fleet_pb2.GetDeviceRequest(id=device_id))
    show(
        output_format(output, json_out), message_to_dict(device), lambda wide: _devices_table([device], wide)
    )


@app.command("describe")
def devices_describe(
    device_id: str = typer.Argument(..., metavar="ID"),
    rollouts: int = typer.Option(20, help="how many recent rollouts to search for this device"),
    output: Output | None = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Everything the control plane knows of one device: its live state and labels, what it was
    told to run by recent rollouts (and what became of it there), and the audit trail naming it.

    Example: edgectl devices describe cam-07
    """
    with connect(server, token, ca) as client:
        device, data = describe_data(client, device_id, rollouts)
    moves, audit = data["rollouts"], data["audit"]
    fmt = output_format(output, json_out)
    if fmt in (Output.JSON, Output.YAML):
        show(fmt, data, lambda wide: Table())
        return
    console.print(_devices_table([device], wide=True))
    table = Table("rollout", "artifact", "state here", "reason", "updated", title="recent rollouts")
    for row in moves:
        table.add_row(row["id"], row["artifact"], row["state"], row["reason"], row["updated_at"])
    console.print(table)
    if audit is None:
        console.print("audit trail: not shown (reading the audit log needs the admin role)")
        return
    trail = Table("when", "who", "action", "outcome", title="audit trail")
    for e in audit:
        actor = e.get("actor", {}).get("identity", "")
        trail.add_row(e.get("at", ""), actor, e.get("action", "").rsplit("/", 1)[-1], e.get("outcome", ""))
    console.print(trail)


def describe_data(client: Any, device_id: str, rollouts: int) -> tuple[fleet_pb2.Device, dict[str, Any]]:
    """What `devices describe` shows: the device, and as JSON-ready data it, its recent rollouts and
    the audit trail naming it (`devices bundle` writes the same as device.json)."""
    device = client.call(client.fleet.GetDevice, fleet_pb2.GetDeviceRequest(id=device_id))
    recent = client.list_all(
        client.rollouts.List, rollouts_pb2.ListRolloutsRequest(), "rollouts", limit=rollouts
    )
    try:
        entries = client.list_all(client.audit.List, rollouts_pb2.ListAuditRequest(), "entries", limit=1000)
        audit: list[Any] | None = [e for e in entries if e.target == device_id]
    except RemoteError as exc:
        if exc.code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            raise
        audit = None  # the audit log is an admin's to read: a viewer still gets the rest
    # List leaves each rollout's devices out (it stays cheap at fleet size); Get has them.
    full = [client.call(client.rollouts.Get, rollouts_pb2.GetRolloutRequest(id=r.id)) for r in recent]
    history = [(r, d) for r in full for w in r.waves for d in w.devices if d.device_id == device_id]
    moves = [
        {"id": r.id, "artifact": f"{r.artifact.name}:{r.artifact.version}",
         "state": enum_name(d.state, rollouts_pb2.DeviceRolloutState, "DEVICE_ROLLOUT_STATE_"),
         "reason": d.reason, "updated_at": d.updated_at.ToJsonString()}
        for r, d in history
    ]  # fmt: skip
    data = {
        "device": message_to_dict(device),
        "rollouts": moves,
        "audit": [message_to_dict(e) for e in audit] if audit is not None else None,
    }
    return device, data


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
    ttl_s = round(parse_duration(ttl))
    if ttl_s < 1:  # 0 on the wire means "the default", so --ttl 0 would mint a token for an hour
        raise UsageError(f"--ttl {ttl} is too short: a token must live at least 1s", hint="e.g. --ttl 1h")
    request = fleet_pb2.CreateEnrollmentTokenRequest(
        device_id=device_id, labels=parse_labels(labels), ttl_seconds=ttl_s
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
    """Decommission a device: revoke its credentials and forget it. A device enrolled but not yet
    joined has its enrollment withdrawn: its token can no longer join.

    Example: edgectl devices rm cam-07
    """
    with connect(server, token, ca) as client:
        done = client.call(client.fleet.DecommissionDevice, fleet_pb2.DecommissionDeviceRequest(id=device_id))
    if done.enrollment_only:
        console.print(
            f"{device_id} had not joined: its enrollment is withdrawn (its token can no longer join)"
        )
    else:
        console.print(f"{device_id} decommissioned")


@app.command("logs")
def devices_logs(
    device_id: str = typer.Argument(..., help="the device's id"),
    since: str = typer.Option("10m", help="how far back, e.g. 30s, 10m, 2h (the agent keeps a bounded ring)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines until Ctrl-C"),
    lines: int = typer.Option(
        200, "--lines", "-n", min=1, max=1000, help="at most this many of the newest lines"
    ),
    output: Output | None = typer.Option(
        None, "--output", "-o", help="text (default) or json (one object per line)", case_sensitive=False
    ),
    as_json: bool = typer.Option(False, "--json", help="the same as -o json"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
) -> None:
    """Print a device's recent log lines, asked of its agent over MQTT (admin token; audited).

    Example: edgectl devices logs cam-07 --since 30m --follow
    """
    from edgectl.cli.device_logs import print_device_logs

    if output == Output.YAML:
        raise UsageError("devices logs prints text or JSON lines", hint="use -o json")
    print_device_logs(device_id, since, follow, lines, as_json or output == Output.JSON, server, token, ca)


@app.command("bundle")
def devices_bundle(
    device_id: str = typer.Argument(..., help="the device's id"),
    out: Path | None = typer.Option(
        None, "--out", help="the .tar.gz to write (default: bundle-ID-TIMESTAMP.tar.gz here)"
    ),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
) -> None:
    """Write a support bundle for one device: device.json (what `devices describe` knows), agent.json
    (its config without secrets, versions, doctor report) and logs.txt (admin token; audited).

    Example: edgectl devices bundle cam-07 --out cam-07.tar.gz
    """
    from edgectl.cli.device_bundle import write_bundle

    write_bundle(device_id, out, server, token, ca)
