"""The control-plane commands: devices, audit, artifact push/ls/rm; deploy, rollout and control-plane
live in :mod:`edgectl.cli.rollout_cmd` and :mod:`edgectl.cli.control_plane_cmd` and are re-exported here.

Thin over :mod:`edgectl.client`: parse flags, make one call, print a table or ``--json``.
A gRPC failure is one line (``not found: rollout r-12 does not exist``) and a non-zero exit.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from edgectl.cli.control_plane_cmd import control_plane_app
from edgectl.cli.output import console, err_console, print_json
from edgectl.cli.remote import (
    CaOpt,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    ago,
    as_dict,
    connect,
    enum_name,
    labels_arg,
)
from edgectl.cli.rollout_cmd import deploy, rollout_app
from edgectl.client import RemoteError, push_artifact
from edgectl.control_plane.strategy import parse_duration, parse_selector
from edgectl.errors import UsageError
from edgectl.protos.v1 import artifacts_pb2, common_pb2, fleet_pb2, rollouts_pb2

# -- devices -------------------------------------------------------------------------------------

devices_app = typer.Typer(help="The fleet's devices: ls, enroll, label, rm.")


@devices_app.command("ls")
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
        print_json([as_dict(d) for d in devices])
        return
    table = Table("id", "online", "active", "desired", "health", "last seen", "labels", "error")
    for d in devices:
        table.add_row(
            d.id, "yes" if d.online else "[red]no[/]",
            f"{d.active.name}:{d.active.version}" if d.active.digest else "-",
            f"{d.desired.name}:{d.desired.version}" if d.desired.digest else "-",
            enum_name(d.health, fleet_pb2.DeviceHealth, "DEVICE_HEALTH_"), ago(d.last_seen),
            ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())), d.last_error,
        )  # fmt: skip
    console.print(table)


@devices_app.command("enroll")
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
        device_id=device_id, labels=labels_arg(labels), ttl_seconds=round(parse_duration(ttl))
    )
    with connect(server, token, ca) as client:
        minted = client.call(client.fleet.CreateEnrollmentToken, request)
    if json_out:
        print_json(as_dict(minted))
        return
    console.print(
        f"enrollment token for {minted.device_id} (one use, expires {minted.expires_at.ToJsonString()}):"
    )
    console.print(minted.token, style="bold", highlight=False, soft_wrap=True)
    err_console.print(
        f"on the device: edgectl agent run --device-id {minted.device_id} --enroll-token TOKEN "
        "--enroll-server CP_HOST:7443 --ca-file ca.crt --control-plane CP_HOST:7444 --data-dir DIR",
        highlight=False,
        soft_wrap=True,
    )


@devices_app.command("label")
def devices_label(
    device_id: str = typer.Argument(..., metavar="ID"),
    labels: list[str] = typer.Argument(..., help="k=v to set, k- to remove"),
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
            key, _, value = item.partition("=")
            to_set[key] = value
        else:
            raise UsageError(
                f"label {item!r} is neither k=v nor k-", hint="e.g. ring=canary, or old- to remove"
            )
    with connect(server, token, ca) as client:
        device = client.call(
            client.fleet.LabelDevice, fleet_pb2.LabelDeviceRequest(id=device_id, set=to_set, remove=remove)
        )
    if json_out:
        print_json(as_dict(device))
    else:
        console.print(f"{device.id}: " + ",".join(f"{k}={v}" for k, v in sorted(device.labels.items())))


@devices_app.command("rm")
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


# -- audit ---------------------------------------------------------------------------------------

audit_app = typer.Typer(help="The audit log of every mutating call.")


@audit_app.command("ls")
def audit_ls(
    since: str | None = typer.Option(None, help="only entries newer than this, e.g. 1h or 30m"),
    action: str = typer.Option("", help="only this method, e.g. /edgectl.v1.RolloutService/Create"),
    limit: int = typer.Option(100, help="at most this many entries"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List who did what, when and from where.

    Example: edgectl audit ls --since 24h
    """
    request = rollouts_pb2.ListAuditRequest(page=common_pb2.Page(page_size=limit), action=action)
    if since:
        request.range.since.FromSeconds(int(time.time() - parse_duration(since)))
    with connect(server, token, ca) as client:
        entries = client.call(client.audit.List, request).entries
    if json_out:
        print_json([as_dict(e) for e in entries])
        return
    table = Table("when", "who", "from", "action", "target", "outcome")
    for e in entries:
        table.add_row(
            e.at.ToJsonString(),
            e.actor.identity,
            e.actor.peer,
            e.action.rsplit(".", 1)[-1],
            e.target,
            e.outcome,
        )
    console.print(table)


# -- artifacts (mounted under `edgectl artifact`) ------------------------------------------------


def artifact_push(
    path: Path = typer.Argument(..., help="artifact directory or .tar"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Upload a signed artifact; resumes by sending only the chunks the control plane lacks.

    Example: edgectl artifact push out/digits-v3/
    """
    if not path.exists():
        raise UsageError(f"{path} does not exist", hint="pass an artifact directory or .tar")
    with connect(server, token, ca) as client:
        result = push_artifact(client, path)
    ref = result.artifact.ref
    if json_out:
        print_json({"artifact": as_dict(result.artifact.ref), "chunks_sent": result.chunks_sent,
                    "bytes_sent": result.bytes_sent, "already_present": result.already_present})  # fmt: skip
    elif result.already_present:
        console.print(f"{ref.name}:{ref.version} {ref.digest} is already on the control plane")
    else:
        console.print(
            f"pushed {ref.name}:{ref.version} {ref.digest} ({result.chunks_sent} chunks, {result.bytes_sent} bytes sent)"
        )


def artifact_ls(
    name: str = typer.Option("", help="only this artifact name"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List the artifacts on the control plane, newest version first.

    Example: edgectl artifact ls --name digits
    """
    with connect(server, token, ca) as client:
        artifacts = client.call(
            client.artifacts.List, artifacts_pb2.ListArtifactsRequest(name=name)
        ).artifacts
    if json_out:
        print_json(
            [{k: v for k, v in as_dict(a).items() if k not in ("manifest", "signatures")} for a in artifacts]
        )
        return
    table = Table("name", "version", "digest", "size", "uploaded", "signed by")
    for a in artifacts:
        table.add_row(
            a.ref.name,
            str(a.ref.version),
            a.ref.digest,
            str(a.total_size),
            ago(a.uploaded_at),
            ",".join(a.key_ids),
        )
    console.print(table)


def artifact_rm(
    artifact: str = typer.Argument(..., help="digest, NAME:VERSION or NAME"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
) -> None:
    """Delete an artifact no rollout or device uses; frees the chunks no other artifact shares.

    Example: edgectl artifact rm digits:2
    """
    with connect(server, token, ca) as client:
        art = client.call(client.artifacts.Get, artifacts_pb2.GetArtifactRequest(artifact=artifact))
        freed = client.call(
            client.artifacts.Delete, artifacts_pb2.DeleteArtifactRequest(digest=art.ref.digest)
        )
    console.print(f"deleted {art.ref.name}:{art.ref.version} ({freed.bytes_freed} bytes freed)")


__all__ = [
    "RemoteError",
    "artifact_ls",
    "artifact_push",
    "artifact_rm",
    "audit_app",
    "control_plane_app",
    "deploy",
    "devices_app",
    "rollout_app",
]
