"""`edgectl control-plane serve` and `edgectl control-plane token`: run a replica, mint bearer tokens."""

from __future__ import annotations

from pathlib import Path

import typer

from edgectl.cli.output import err_console, print_json
from edgectl.cli.remote import JsonOpt
from edgectl.control_plane.strategy import parse_duration
from edgectl.errors import UsageError

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
        False, "--insecure", help="dev mode: plaintext, no authentication, one listener"
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
