"""The control-plane commands: deploy, rollout, devices, audit, artifact push/ls/rm, control-plane serve.

Thin over :mod:`edgectl.client`: parse flags, make one call, print a table or ``--json``.
A gRPC failure is one line (``not found: rollout r-12 does not exist``) and a non-zero exit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.table import Table

from edgectl.cli.output import console, err_console, print_json
from edgectl.client import (
    ControlPlaneClient,
    RemoteError,
    push_artifact,
    resolve_credentials,
    resolve_server,
)
from edgectl.control_plane.strategy import parse_duration, parse_selector
from edgectl.errors import EdgectlError, UsageError
from edgectl.protos.v1 import artifacts_pb2, common_pb2, fleet_pb2, rollouts_pb2

SERVER_HELP = "control plane HOST:PORT (else EDGECTL_SERVER, config.toml, or `edgectl up`'s endpoints.json)"
ServerOpt = typer.Option(None, "--server", "-s", help=SERVER_HELP)
TokenOpt = typer.Option(
    None, "--token", help="bearer token (else EDGECTL_TOKEN or token in config.toml); never printed"
)
CaOpt = typer.Option(
    None, "--ca", help="fleet CA certificate to trust (else EDGECTL_CA or ca in config.toml)"
)
JsonOpt = typer.Option(False, "--json", help="print JSON instead of a table")


def _client(server: str | None, token: str | None = None, ca: Path | None = None) -> ControlPlaneClient:
    return ControlPlaneClient(resolve_server(server), credentials=resolve_credentials(token, ca))


def _dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _state(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _short(digest: str) -> str:
    return digest[:19] if digest else "-"


def _ago(ts: Any) -> str:
    if not ts.seconds:
        return "-"
    delta = max(0, int(time.time() - ts.seconds))
    return (
        f"{delta}s ago" if delta < 120 else f"{delta // 60}m ago" if delta < 7200 else f"{delta // 3600}h ago"
    )


def _labels(text: str | None) -> dict[str, str]:
    return dict(parse_selector(text).labels) if text else {}


# -- deploy and rollouts -------------------------------------------------------------------------


def deploy(
    artifact: str = typer.Argument(
        ..., help="artifact digest, NAME:VERSION, NAME (newest) or a bundle path to push"
    ),
    to: str = typer.Option(..., "--to", help="device selector: k=v[,k=v] labels, or id=DEVICE[,id=...]"),
    strategy: str = typer.Option("1,10%,50%,100%", help="cumulative wave sizes: counts or percentages"),
    max_failures: str = typer.Option("0", help="failure budget: N devices or N% of the targets"),
    health_timeout: str = typer.Option("2m", help="time a device has to report the new model healthy"),
    soak: str = typer.Option("0", help="soak window after a device is healthy, e.g. 5m (0: none)"),
    max_error_rate: float = typer.Option(
        0.0, help="fail a device whose error rate exceeds this during the soak"
    ),
    max_p99_ms: float = typer.Option(
        0.0, help="fail a device whose p99 latency (ms) exceeds this during the soak"
    ),
    offline: str = typer.Option("fail", help="a device offline past the timeout: fail or skip"),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="follow the rollout live; exit 0 only on success"
    ),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Roll an artifact out to the devices a selector picks, in gated waves.

    Example: edgectl deploy digits:3 --to site=lab --strategy 1,10%,50%,100% --max-failures 1 --watch
    """
    if offline not in ("fail", "skip"):
        raise UsageError(f"--offline {offline!r} must be fail or skip")
    spec = rollouts_pb2.Strategy(
        waves=[w.strip() for w in strategy.split(",") if w.strip()],
        max_failures=max_failures,
        health_timeout_seconds=max(1, round(parse_duration(health_timeout))),
        soak_seconds=round(parse_duration(soak)),
        max_error_rate=max_error_rate,
        max_p99_ms=max_p99_ms,
        offline_policy=rollouts_pb2.OFFLINE_POLICY_SKIP
        if offline == "skip"
        else rollouts_pb2.OFFLINE_POLICY_FAIL,
    )
    selector = parse_selector(to)
    with _client(server, token, ca) as client:
        ref = artifact
        if Path(artifact).exists():
            pushed = push_artifact(client, Path(artifact))
            ref = pushed.artifact.ref.digest
            if not json_out:
                console.print(
                    f"pushed {pushed.artifact.ref.name}:{pushed.artifact.ref.version} ({_short(ref)})"
                )
        request = rollouts_pb2.CreateRolloutRequest(
            artifact=ref,
            selector=common_pb2.Selector(match_labels=selector.labels, device_ids=list(selector.device_ids)),
            strategy=spec,
        )
        rollout = client.call(client.rollouts.Create, request)
        if not watch:
            if json_out:
                print_json(_dict(rollout))
            else:
                console.print(f"rollout [bold]{rollout.id}[/] created: {_summary(rollout)}")
                console.print(f"follow it with: edgectl rollout status {rollout.id} --watch")
            return
        final = _watch(client, rollout.id, quiet=json_out)
    _finish(final, json_out)


def _finish(rollout: rollouts_pb2.Rollout, json_out: bool) -> None:
    if json_out:
        print_json(_dict(rollout))
    state = _state(rollout.state, rollouts_pb2.RolloutState, "ROLLOUT_STATE_")
    if rollout.state != rollouts_pb2.ROLLOUT_STATE_SUCCEEDED:
        raise EdgectlError(
            f"rollout {rollout.id} ended {state}" + (f": {rollout.reason}" if rollout.reason else "")
        )
    if not json_out:
        console.print(f"[green]rollout {rollout.id} succeeded[/]")


def _summary(r: rollouts_pb2.Rollout) -> str:
    devices = sum(len(w.devices) for w in r.waves)
    return (
        f"{r.artifact.name}:{r.artifact.version} to {devices} device(s) in {len(r.waves)} wave(s), "
        f"{_state(r.state, rollouts_pb2.RolloutState, 'ROLLOUT_STATE_')}"
    )


def _rollout_table(r: rollouts_pb2.Rollout, events: list[str]) -> Table:
    state = _state(r.state, rollouts_pb2.RolloutState, "ROLLOUT_STATE_")
    table = Table(
        title=f"{r.id}  {r.artifact.name}:{r.artifact.version}  [bold]{state}[/]  failures {r.failures}"
    )
    for col in ("wave", "state", "devices", "healthy", "failed", "waiting", "other"):
        table.add_column(col)
    failed: list[str] = []
    for w in r.waves:
        counts = dict.fromkeys(("healthy", "failed", "desired"), 0)
        other = 0
        for d in w.devices:
            name = _state(d.state, rollouts_pb2.DeviceRolloutState, "DEVICE_ROLLOUT_STATE_")
            if name in counts:
                counts[name] += 1
            else:
                other += 1
            if d.state == rollouts_pb2.DEVICE_ROLLOUT_STATE_FAILED:
                failed.append(f"{d.device_id}: {d.reason}")
        table.add_row(
            str(w.index + 1), _state(w.state, rollouts_pb2.WaveState, "WAVE_STATE_"), str(len(w.devices)),
            str(counts["healthy"]), str(counts["failed"]), str(counts["desired"]), str(other),
        )  # fmt: skip
    caption = [f"failed: {f}" for f in failed[:5]] + events[-5:]
    if r.reason:
        caption.insert(0, r.reason)
    table.caption = "\n".join(caption)
    return table


def _watch(client: ControlPlaneClient, rollout_id: str, quiet: bool = False) -> rollouts_pb2.Rollout:
    """Follow the Watch stream, redrawing at most 4x a second; returns the final rollout."""
    from rich.console import Console
    from rich.live import Live

    events: list[str] = []
    get = rollouts_pb2.GetRolloutRequest(id=rollout_id)
    rollout: rollouts_pb2.Rollout = client.call(client.rollouts.Get, get)
    stream = client.rollouts.Watch(rollouts_pb2.WatchRolloutRequest(id=rollout_id))
    last_draw = 0.0
    # --json keeps stdout for the final document: the live view is not drawn at all.
    screen = Console(quiet=True) if quiet else console
    try:
        with Live(_rollout_table(rollout, events), console=screen, transient=False) as live:
            for event in stream:
                where = f" {event.device_id}" if event.device_id else ""
                events.append(f"#{event.sequence} {event.kind}{where} {event.message}".rstrip())
                if time.monotonic() - last_draw > 0.25 or event.HasField("rollout"):
                    rollout = client.call(client.rollouts.Get, get)
                    live.update(_rollout_table(rollout, events))
                    last_draw = time.monotonic()
            rollout = client.call(client.rollouts.Get, get)
            live.update(_rollout_table(rollout, events))
    except grpc.RpcError as exc:
        raise client.error(exc) from None
    return rollout


rollout_app = typer.Typer(help="Inspect and steer rollouts: ls, status, pause, resume, abort, rollback.")


@rollout_app.command("ls")
def rollout_ls(
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List rollouts, newest first.

    Example: edgectl rollout ls --json
    """
    with _client(server, token, ca) as client:
        rollouts = client.call(client.rollouts.List, rollouts_pb2.ListRolloutsRequest()).rollouts
    if json_out:
        print_json([_dict(r) for r in rollouts])
        return
    table = Table("id", "artifact", "state", "wave", "failures", "created", "reason")
    for r in rollouts:
        table.add_row(
            r.id, f"{r.artifact.name}:{r.artifact.version}", _state(r.state, rollouts_pb2.RolloutState, "ROLLOUT_STATE_"),
            f"{r.current_wave + 1}/{len(r.waves)}", str(r.failures), _ago(r.created_at), r.reason,
        )  # fmt: skip
    console.print(table)


@rollout_app.command("status")
def rollout_status(
    rollout_id: str = typer.Argument(..., metavar="ID", help="rollout id"),
    watch: bool = typer.Option(False, "--watch", "-w", help="follow it live until it ends"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show a rollout's waves and devices.

    Example: edgectl rollout status r-1a2b3c4d --watch
    """
    with _client(server, token, ca) as client:
        if watch:
            _finish(_watch(client, rollout_id, quiet=json_out), json_out)
            return
        rollout = client.call(client.rollouts.Get, rollouts_pb2.GetRolloutRequest(id=rollout_id))
    if json_out:
        print_json(_dict(rollout))
    else:
        console.print(_rollout_table(rollout, []))


def _action(action: str, summary: str) -> None:
    def command(
        rollout_id: str = typer.Argument(..., metavar="ID", help="rollout id"),
        reason: str = typer.Option("", help="why, for the rollout's log"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        ca: Path | None = CaOpt,
        json_out: bool = JsonOpt,
    ) -> None:
        with _client(server, token, ca) as client:
            method = getattr(client.rollouts, action.capitalize())
            rollout = client.call(method, rollouts_pb2.RolloutActionRequest(id=rollout_id, reason=reason))
        if json_out:
            print_json(_dict(rollout))
        else:
            console.print(
                f"rollout {rollout.id}: {_state(rollout.state, rollouts_pb2.RolloutState, 'ROLLOUT_STATE_')}"
            )

    command.__doc__ = (
        f"{summary}\n\nExample: edgectl rollout {action} r-1a2b3c4d --reason 'latency regression'"
    )
    rollout_app.command(action)(command)


for _name, _summary_text in [
    ("pause", "Pause a rollout: the current wave finishes, the next does not start."),
    ("resume", "Resume a paused rollout."),
    ("abort", "Stop a rollout; devices already moved keep the new artifact."),
    ("rollback", "Stop a rollout and move every moved device back to its previous artifact."),
]:
    _action(_name, _summary_text)


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
    with _client(server, token, ca) as client:
        devices = client.call(client.fleet.ListDevices, request).devices
    if json_out:
        print_json([_dict(d) for d in devices])
        return
    table = Table("id", "online", "active", "desired", "health", "last seen", "labels", "error")
    for d in devices:
        table.add_row(
            d.id, "yes" if d.online else "[red]no[/]",
            f"{d.active.name}:{d.active.version}" if d.active.digest else "-",
            f"{d.desired.name}:{d.desired.version}" if d.desired.digest else "-",
            _state(d.health, fleet_pb2.DeviceHealth, "DEVICE_HEALTH_"), _ago(d.last_seen),
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
        device_id=device_id, labels=_labels(labels), ttl_seconds=round(parse_duration(ttl))
    )
    with _client(server, token, ca) as client:
        minted = client.call(client.fleet.CreateEnrollmentToken, request)
    if json_out:
        print_json(_dict(minted))
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
    with _client(server, token, ca) as client:
        device = client.call(
            client.fleet.LabelDevice, fleet_pb2.LabelDeviceRequest(id=device_id, set=to_set, remove=remove)
        )
    if json_out:
        print_json(_dict(device))
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
    with _client(server, token, ca) as client:
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
    with _client(server, token, ca) as client:
        entries = client.call(client.audit.List, request).entries
    if json_out:
        print_json([_dict(e) for e in entries])
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
    with _client(server, token, ca) as client:
        result = push_artifact(client, path)
    ref = result.artifact.ref
    if json_out:
        print_json({"artifact": _dict(result.artifact.ref), "chunks_sent": result.chunks_sent,
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
    with _client(server, token, ca) as client:
        artifacts = client.call(
            client.artifacts.List, artifacts_pb2.ListArtifactsRequest(name=name)
        ).artifacts
    if json_out:
        print_json(
            [{k: v for k, v in _dict(a).items() if k not in ("manifest", "signatures")} for a in artifacts]
        )
        return
    table = Table("name", "version", "digest", "size", "uploaded", "signed by")
    for a in artifacts:
        table.add_row(
            a.ref.name,
            str(a.ref.version),
            a.ref.digest,
            str(a.total_size),
            _ago(a.uploaded_at),
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
    with _client(server, token, ca) as client:
        art = client.call(client.artifacts.Get, artifacts_pb2.GetArtifactRequest(artifact=artifact))
        freed = client.call(
            client.artifacts.Delete, artifacts_pb2.DeleteArtifactRequest(digest=art.ref.digest)
        )
    console.print(f"deleted {art.ref.name}:{art.ref.version} ({freed.bytes_freed} bytes freed)")


# -- the server ----------------------------------------------------------------------------------

control_plane_app = typer.Typer(help="Run the control plane (gRPC API, state, rollout controller).")


@control_plane_app.callback()
def _control_plane() -> None:
    """Run the control plane (gRPC API, state, rollout controller)."""


@control_plane_app.command("serve")
def control_plane_serve(
    listen: str = typer.Option(
        "127.0.0.1:7443", help="gRPC for people and CI HOST:PORT (TLS + bearer tokens when secured)"
    ),
    device_listen: str = typer.Option(
        "127.0.0.1:7444", help="gRPC for agents HOST:PORT (mTLS, fleet-CA client certificates)"
    ),
    security_dir: Path | None = typer.Option(
        None,
        envvar="EDGECTL_SECURITY_DIR",
        help="fleet CA, token key, broker credentials: the directory `edgectl broker config -o` wrote",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="dev mode: plaintext, no authentication (loopback-only listen implies it)"
    ),
    tls_name: list[str] = typer.Option(
        [], "--tls-name", help="name/IP the server certificate covers (repeat) [default: loopback, hostname]"
    ),
    mqtt: str | None = typer.Option(
        None,
        envvar="EDGECTL_MQTT",
        help="broker URL [default: the security dir's broker credentials, else mqtt://127.0.0.1:1883]",
    ),
    state: str = typer.Option("sqlite:///edgectl.db", help="sqlite:///FILE or postgresql://USER@HOST/DB"),
    blobs: str = typer.Option("./blobs", help="blob store: a directory or s3://bucket/prefix"),
    trust: list[Path] = typer.Option(
        [], help="trusted signing key (PEM file or dir); repeatable; default: yours"
    ),
    metrics_listen: str | None = typer.Option(
        None, help="Prometheus /metrics on HOST:PORT (port 0: a free one)"
    ),
    device_mqtt: str = typer.Option("", help="broker URL handed to devices at enrollment (default: --mqtt)"),
    auto_register: bool = typer.Option(
        True, help="add devices that report without enrolling to the inventory"
    ),
    log_format: str = typer.Option("text", help="text or json (one object per line)"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Serve the gRPC API and drive rollouts over MQTT.

    Example: edgectl control-plane serve --security-dir /etc/edgectl/fleet --listen 0.0.0.0:7443 --device-listen 0.0.0.0:7444 --tls-name cp.lab --state postgresql://cp@db/edgectl
    """
    from edgectl.control_plane.logs import configure
    from edgectl.control_plane.server import ControlPlane, ControlPlaneConfig

    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format {log_format!r} must be text or json")
    if insecure and security_dir is not None:
        raise UsageError("--insecure and --security-dir contradict each other", hint="pass one of them")
    configure(log_format, log_level)
    config = ControlPlaneConfig(
        listen=listen, device_listen=device_listen, insecure=insecure, security_dir=security_dir,
        tls_names=tuple(tls_name), mqtt_url=mqtt or "", state_url=state, blobs=blobs, trust=tuple(trust),
        metrics_listen=metrics_listen, device_mqtt_url=device_mqtt, auto_register=auto_register,
    )  # fmt: skip
    plane = ControlPlane(config)
    plane.start()
    if plane.security is None:
        err_console.print(
            f"[bold red]INSECURE[/] control plane serving plaintext on {plane.address}, no authentication"
            + (f", metrics on :{plane.metrics.port}" if plane.metrics.port else "")
        )
    else:
        err_console.print(
            f"control plane serving TLS on {plane.address} (tokens), mTLS for agents on {plane.device_address}"
            + (f", metrics on :{plane.metrics.port}" if plane.metrics.port else "")
        )
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    plane.stop()


@control_plane_app.command("token")
def control_plane_token(
    subject: str = typer.Option(..., "--subject", help="who the token speaks for, e.g. alice or ci"),
    role: str = typer.Option("viewer", help="viewer, deployer or admin"),
    ttl: str = typer.Option("720h", help="how long it stays valid, e.g. 12h, 720h"),
    security_dir: Path = typer.Option(
        ..., envvar="EDGECTL_SECURITY_DIR", help="the control plane's --security-dir (holds token.key)"
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Mint a bearer token signed with the control plane's token key (run it where that key lives).

    The token is the only thing printed on stdout, so `export EDGECTL_TOKEN=$(edgectl control-plane
    token ...)` works. Example: edgectl control-plane token --security-dir /etc/edgectl/fleet --role deployer --subject ci
    """
    from edgectl.control_plane.security import TOKEN_KEY_FILE
    from edgectl.security.tokens import Role, TokenIssuer

    parsed = Role.parse(role)
    if parsed == Role.DEVICE:
        raise UsageError("devices authenticate with certificates from enrollment, not tokens",
                         hint="use viewer, deployer or admin")  # fmt: skip
    key = security_dir / TOKEN_KEY_FILE
    if not key.exists():
        raise UsageError(
            f"{key} does not exist", hint="start the control plane once with --security-dir, which makes it"
        )
    seconds = round(parse_duration(ttl))
    issuer = TokenIssuer.load_or_create(key)
    token = issuer.issue(subject, parsed, ttl_s=seconds)
    if json_out:
        print_json({"subject": subject, "role": parsed.name.lower(), "expires_in_s": seconds, "token": token})
        return
    err_console.print(f"token for {subject} ({parsed.name.lower()}), valid {ttl}:")
    print(token)


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
