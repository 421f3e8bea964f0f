"""`edgectl control-plane serve`, `migrate`, `init`, `token`, `revoke-token` and `rotate-fleet-key`.

Run a replica, migrate its state store (a Kubernetes Job), make the secrets replicas share, mint and
revoke bearer tokens, and hand the fleet's trust to a new desired-state signing key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgectl.cli.output import console, err_console, print_json
from edgectl.cli.remote import CaOpt, JsonOpt, ServerOpt, TokenOpt, connect, message_to_dict
from edgectl.control_plane.strategy import parse_duration
from edgectl.errors import UsageError
from edgectl.security.files import private_umask

# -- the server ----------------------------------------------------------------------------------

app = typer.Typer(help="Run the control plane (gRPC API, state, rollout controller).")


@app.callback()
def _control_plane() -> None:
    """Run the control plane (gRPC API, state, rollout controller)."""


@app.command("serve")
def control_plane_serve(
    listen: str = typer.Option(
        "127.0.0.1:7443",
        help="gRPC for people and CI HOST:PORT (TLS + bearer tokens when secured)",
        envvar="EDGECTL_CP_LISTEN",
    ),
    device_listen: str = typer.Option(
        "127.0.0.1:7444",
        help="gRPC for agents HOST:PORT (mTLS, fleet-CA client certificates)",
        envvar="EDGECTL_CP_DEVICE_LISTEN",
    ),
    security_dir: Path | None = typer.Option(
        None,
        envvar="EDGECTL_SECURITY_DIR",
        help="fleet CA, token key, broker credentials: the directory `edgectl broker config --out` wrote",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="dev mode: plaintext, no authentication, one listener",
        envvar="EDGECTL_CP_INSECURE",
    ),
    tls_name: list[str] = typer.Option(
        [],
        "--tls-name",
        help="name/IP the server certificate covers (repeat) [default: loopback, hostname]",
        envvar="EDGECTL_CP_TLS_NAMES",
    ),
    mqtt: str | None = typer.Option(
        None,
        envvar="EDGECTL_MQTT",
        help="broker URL [default: the security dir's broker credentials, else mqtt://127.0.0.1:1883]",
    ),
    state: str = typer.Option(
        "sqlite:///edgectl.db",
        envvar="EDGECTL_STATE",
        help="sqlite:///FILE or postgresql://USER@HOST/DB (from the environment, a password stays out of argv)",
    ),
    db_pool_size: int = typer.Option(
        16,
        min=1,
        help="PostgreSQL connections this replica may hold (SQLite keeps one writer)",
        envvar="EDGECTL_CP_DB_POOL_SIZE",
    ),
    blobs: str = typer.Option(
        "./blobs", help="blob store: a directory or s3://bucket/prefix", envvar="EDGECTL_BLOBS"
    ),
    blob_url_ttl: str = typer.Option(
        "5m",
        help="with s3:// blobs, devices GET chunks by presigned URLs that work this long",
        envvar="EDGECTL_CP_BLOB_URL_TTL",
    ),
    trust: list[Path] = typer.Option(
        [], help="trusted signing key (PEM file or dir); repeatable; default: yours", envvar="EDGECTL_TRUST"
    ),
    metrics_listen: str | None = typer.Option(
        None, help="Prometheus /metrics on HOST:PORT (port 0: a free one)", envvar="EDGECTL_CP_METRICS_LISTEN"
    ),
    site_broker: list[Path] = typer.Option(
        [],
        "--site-broker",
        help="a site broker's config dir (`broker config --bridge-to`); repeat per site (env: space-separated)",
        envvar="EDGECTL_SITE_BROKERS",
    ),
    health_listen: str | None = typer.Option(
        None,
        help="plaintext gRPC health service alone on HOST:PORT, for kubelet's gRPC probes",
        envvar="EDGECTL_CP_HEALTH_LISTEN",
    ),
    device_mqtt: str = typer.Option(
        "", help="broker URL handed to devices at enrollment (default: --mqtt)", envvar="EDGECTL_DEVICE_MQTT"
    ),
    console_listen: str | None = typer.Option(
        None,
        envvar="EDGECTL_CP_CONSOLE_LISTEN",
        help="the read-only web console on HOST:PORT (HTTPS + the API's tokens when secured)",
    ),
    auto_register: bool = typer.Option(
        True,
        help="add devices that report without enrolling to the inventory",
        envvar="EDGECTL_CP_AUTO_REGISTER",
    ),
    device_events: bool = typer.Option(
        False,
        help="also receive every device's events (progress, stages) and log their failures; off, the "
        "control plane reads reports only, which carry every failure it acts on",
        envvar="EDGECTL_CP_DEVICE_EVENTS",
    ),
    order_ttl: str = typer.Option(
        "168h",
        help="a signed desired state expires this long after issue (re-signed at half of it)",
        envvar="EDGECTL_CP_ORDER_TTL",
    ),
    fleet_burst_budget: float | None = typer.Option(
        None,
        help="the whole fleet's burst budget per period, in the agents' --burst-price-* currency; "
        "agents get shares of it as grants and stop bursting when it is spent",
        envvar="EDGECTL_CP_FLEET_BURST_BUDGET",
    ),
    fleet_burst_period: str = typer.Option(
        "1h",
        help="the fleet burst budget's period (e.g. 1h, 24h); periods start at its multiples, UTC",
        envvar="EDGECTL_CP_FLEET_BURST_PERIOD",
    ),
    log_format: str = typer.Option(
        "text", help="text or json (one object per line)", envvar="EDGECTL_LOG_FORMAT"
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error", envvar="EDGECTL_LOG_LEVEL"),
) -> None:
    """Serve the gRPC API and drive rollouts over MQTT.

    Example: edgectl control-plane serve --security-dir /etc/edgectl/fleet --listen 0.0.0.0:7443 --device-listen 0.0.0.0:7444 --tls-name cp.lab --state postgresql://cp@db/edgectl
    """
    from edgectl.control_plane.burst_grants import FleetBurstBudget
    from edgectl.control_plane.config import ControlPlaneConfig
    from edgectl.control_plane.logs import configure
    from edgectl.control_plane.server import ControlPlane

    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format {log_format!r} must be text or json")
    if insecure and security_dir is not None:
        raise UsageError("--insecure and --security-dir contradict each other", hint="pass one of them")
    order_ttl_s = parse_duration(order_ttl)
    if order_ttl_s < 2:
        raise UsageError(f"--order-ttl {order_ttl} is too short", hint="e.g. 168h (a week), 24h")
    blob_url_ttl_s = parse_duration(blob_url_ttl)
    if not 10 <= blob_url_ttl_s <= 7 * 24 * 3600:
        raise UsageError(f"--blob-url-ttl {blob_url_ttl} must be 10s to 7 days", hint="e.g. 5m")
    fleet_burst_period_s = parse_duration(fleet_burst_period)
    if fleet_burst_budget is not None:  # a bad budget fails before anything is opened
        FleetBurstBudget(fleet_burst_budget, fleet_burst_period_s)
    configure(log_format, log_level)
    config = ControlPlaneConfig(
        listen=listen, device_listen=device_listen, insecure=insecure, security_dir=security_dir,
        tls_names=tuple(tls_name), mqtt_url=mqtt or "", state_url=state, db_pool_size=db_pool_size,
        blobs=blobs, trust=tuple(trust), metrics_listen=metrics_listen, health_listen=health_listen,
        site_brokers=tuple(site_broker), console_listen=console_listen,
        device_mqtt_url=device_mqtt, auto_register=auto_register, order_ttl_s=order_ttl_s,
        blob_url_ttl_s=int(blob_url_ttl_s), fleet_burst_budget=fleet_burst_budget,
        fleet_burst_period_s=fleet_burst_period_s, device_events=device_events,
    )  # fmt: skip
    with private_umask():  # the state store (SQLite + WAL), blobs and keys: this user's only
        _serve(ControlPlane(config))


def _serve(plane: Any) -> None:
    """Start ``plane``, say where it listens, and serve until SIGINT/SIGTERM."""
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
    if plane.console is not None:
        err_console.print(f"console on {plane.console.scheme}://{plane.config.console_listen}")
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    plane.stop()


@app.command("migrate")
def control_plane_migrate(
    state: str = typer.Option(
        ..., envvar="EDGECTL_STATE", help="sqlite:///FILE or postgresql://USER@HOST/DB (or EDGECTL_STATE)"
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Apply the state store's schema migrations, then exit (a Kubernetes Job before replicas start).

    Replicas also migrate on start, serialized by a lock; this runs it once, ahead, and fails loudly.
    Example: EDGECTL_STATE=postgresql://cp@db/edgectl edgectl control-plane migrate
    """
    from edgectl.control_plane.store import StateStore

    store = StateStore(state)
    try:
        applied, version = store.applied_now, store.schema_version()
    finally:
        store.close()
    if json_out:
        print_json({"dialect": store.dialect, "applied": applied, "schema_version": version})
        return
    done = f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply"
    console.print(f"{store.dialect} state store at schema version {version} ({done})")


@app.command("init")
def control_plane_init(
    security_dir: Path = typer.Option(
        ..., "--security-dir", envvar="EDGECTL_SECURITY_DIR", help="directory to make (kept files are reused)"
    ),
) -> None:
    """Make the fleet CA, token key and fleet (desired-state) key once, so every replica loads the same ones.

    Run `edgectl broker config --out DIR` on the same DIR for the broker's files and credentials.
    Example: edgectl control-plane init --security-dir fleet && kubectl create secret generic edgectl-security --from-file=fleet/
    """
    from edgectl.control_plane.fleet_key import FLEET_KEY_FILE, FleetKeyring
    from edgectl.control_plane.security import TOKEN_KEY_FILE
    from edgectl.security.pki import FleetCA
    from edgectl.security.tokens import TokenIssuer

    security_dir.mkdir(parents=True, exist_ok=True)
    FleetCA.load_or_create(security_dir)
    TokenIssuer.load_or_create(security_dir / TOKEN_KEY_FILE)
    # Replicas must share one desired-state signing key: made here, never per replica.
    FleetKeyring.load_or_create(security_dir)
    console.print(
        f"fleet CA, token key and fleet key in {security_dir} (ca.crt, ca.key, {TOKEN_KEY_FILE}, {FLEET_KEY_FILE})"
    )


@app.command("token")
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
    from edgectl.security.errors import TokenError
    from edgectl.security.tokens import Role, TokenIssuer

    try:
        parsed = Role.parse(role)
    except TokenError:
        raise UsageError(f"unknown role {role!r}", hint="use viewer, deployer or admin") from None
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
    try:
        token = issuer.issue(subject, parsed, ttl_s=seconds)
    except TokenError as exc:  # a lifetime of 0 or over the limit: the flag's value to fix
        raise UsageError(str(exc)) from exc
    token_id = issuer.verifier().verify(token).token_id
    if json_out:
        print_json({"subject": subject, "role": parsed.name.lower(), "expires_in_s": seconds, "id": token_id,
                    "token": token})  # fmt: skip
        return
    err_console.print(
        f"token {token_id} for {subject} ({parsed.name.lower()}), valid {ttl} "
        f"(revoke it with `edgectl control-plane revoke-token --id {token_id}`):"
    )
    print(token)


@app.command("rotate-fleet-key")
def control_plane_rotate_fleet_key(
    security_dir: Path = typer.Option(
        ..., envvar="EDGECTL_SECURITY_DIR", help="the control plane's --security-dir (holds fleet-key.pem)"
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Replace the key that signs desired states; agents follow a statement signed by the old key.

    Running replicas pick the new key up on their next signature and re-sign every device's
    desired state with it. Example: edgectl control-plane rotate-fleet-key --security-dir /etc/edgectl/fleet
    """
    from edgectl.control_plane.fleet_key import FLEET_KEY_FILE, FleetKeyring

    if not (security_dir / FLEET_KEY_FILE).exists():
        raise UsageError(
            f"{security_dir / FLEET_KEY_FILE} does not exist",
            hint="start the control plane once with --security-dir, which makes it",
        )
    ring = FleetKeyring.load_or_create(security_dir)
    rotation = ring.rotate()
    if json_out:
        print_json({"previous_key_id": rotation.previous_key_id, "key_id": rotation.new_key_id})
        return
    console.print(f"fleet key {rotation.previous_key_id} -> {rotation.new_key_id}: desired states are re-signed "
                  "by the running control plane; agents move their trust when they receive one")  # fmt: skip


@app.command("revoke-token")
def control_plane_revoke_token(
    revoked: str | None = typer.Argument(
        None, metavar="TOKEN", help="the token to revoke (or give --id)", show_default=False
    ),
    token_id: str | None = typer.Option(None, "--id", help="the token's id, as `token` printed it"),
    reason: str = typer.Option("", help="why, for the audit log"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Revoke one bearer token on every replica at once, before it expires (needs the admin role).

    Give the token itself, or its id when you no longer hold the token (a CI secret, a lost laptop).
    Tokens not revoked keep working; to void every token at once, replace token.key instead.
    Example: edgectl control-plane revoke-token --id 3f9c2a71d04b8e65 --reason "left the team"
    """
    from edgectl.protos.v1 import fleet_pb2

    if bool(revoked) == bool(token_id):
        raise UsageError("give the token to revoke, or --id with its id (not both)")
    request = fleet_pb2.RevokeTokenRequest(token=revoked or "", token_id=token_id or "", reason=reason)
    with connect(server, token, ca) as client:
        done = client.call(client.fleet.RevokeToken, request)
    if json_out:
        print_json(message_to_dict(done))
        return
    whose = f" of {done.subject}" if done.subject else ""
    state = "revoked" if done.newly_revoked else "was already revoked"
    console.print(f"token {done.token_id}{whose} {state}")
