"""What one control-plane replica is configured with (`edgectl control-plane serve`'s flags) and
the start-up checks that read it: the listeners' addresses, the trusted keys, the security dir."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.addresses import HostPort, parse_host_port
from edgectl.artifact import TrustStore
from edgectl.artifact.keystore import default_trust_store
from edgectl.control_plane.chunk_urls import DEFAULT_URL_TTL_S
from edgectl.control_plane.db import DEFAULT_POOL_SIZE
from edgectl.control_plane.desired import DEFAULT_ORDER_TTL_S
from edgectl.control_plane.errors import ControlPlaneError
from edgectl.control_plane.security import FleetSecurity, default_tls_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlPlaneConfig:
    """Everything `edgectl control-plane serve` takes; defaults run on one machine."""

    listen: str = "127.0.0.1:7443"  # people and CI: TLS + bearer tokens (plaintext with ``insecure``)
    device_listen: str = "127.0.0.1:7444"  # agents: mTLS with fleet-CA client certificates
    mqtt_url: str = ""  # "": the broker credentials' URL in security_dir, else mqtt://127.0.0.1:1883
    insecure: bool = False  # dev mode: plaintext, no authentication, one listener
    security_dir: Path | None = (
        None  # fleet CA, token key, broker credentials (`edgectl broker config --out`)
    )
    tls_names: tuple[str, ...] = ()  # names the server certificate covers; default: loopback + hostname
    tls_cert: Path | None = None  # a server certificate of your own (else one issued by the fleet CA)
    tls_key: Path | None = None
    state_url: str = "sqlite:///edgectl.db"
    db_pool_size: int = DEFAULT_POOL_SIZE  # PostgreSQL connections of this replica (SQLite: one writer)
    blobs: str = "./blobs"
    blob_url_ttl_s: int = DEFAULT_URL_TTL_S  # presigned chunk URLs (s3:// blobs) work this long
    trust: tuple[Path, ...] = ()  # trusted public keys (files or dirs); empty: the user's default trust
    metrics_listen: str | None = None  # HOST:PORT, port 0 for a free one; None: off
    site_brokers: tuple[Path, ...] = ()  # site brokers' config dirs: their devices' identities go there too
    health_listen: str | None = None  # plaintext gRPC health only (kubelet probes), HOST:PORT; None: off
    console_listen: str | None = (
        None  # the read-only web console on HOST:PORT (HTTPS when secured); None: off
    )
    device_mqtt_url: str = ""  # the broker URL handed to devices at enrollment (default: mqtt_url)
    auto_register: bool = True  # devices that report without enrolling join the inventory
    # Subscribe to every device's events and log their failures. Off: reports carry every failure
    # the controller acts on, and an event is a message per device the leader need not receive.
    device_events: bool = False
    tick_seconds: float = 0.25
    leader_interval: float = 1.0
    workers: int = 32  # the people listener's pool
    device_workers: int = 32  # the agents' listener has its own pool: people cannot starve it
    streams_per_caller: int = 8  # open Watch/Download streams one person may hold
    enroll_failure_burst: int = 10  # failed Enrolls one peer may make at once ...
    enroll_failure_refill_s: float = 6.0  # ... and one more every this many seconds
    order_ttl_s: float = DEFAULT_ORDER_TTL_S  # a signed desired state expires this long after issue
    # The whole fleet's burst budget per period, in the agents' --burst-price-* currency (None: none);
    # agents get shares of it as grants (control_plane/burst_grants.py).
    fleet_burst_budget: float | None = None
    fleet_burst_period_s: float = 3600.0
    extra: dict[str, str] = field(default_factory=dict)


def load_trust(paths: tuple[Path, ...]) -> TrustStore:
    if not paths:
        return default_trust_store()
    trust = TrustStore()
    for p in paths:
        trust.add_path(Path(p))
    return trust


def listen_address(text: str, what: str) -> HostPort:
    """A listener's ``HOST:PORT`` (``:PORT`` binds every interface; port 0 lets the OS pick)."""
    return parse_host_port(text, what=what, default_host="0.0.0.0", listen=True)


def load_security(config: ControlPlaneConfig) -> FleetSecurity | None:
    """The secured mode's secrets, or None in the explicit insecure mode; neither is an error."""
    if config.insecure:
        log.warning(
            "INSECURE MODE: plaintext gRPC, no authentication, every caller is an anonymous admin. "
            "Use it on one development machine only; run with --security-dir for a real fleet."
        )
        return None
    if config.security_dir is None:
        raise ControlPlaneError(
            "the control plane needs --security-dir DIR (TLS, tokens, fleet CA) or an explicit --insecure",
            hint="make DIR with `edgectl broker config --out DIR`; --insecure is for a development box only",
        )
    hosts = [
        listen_address(config.listen, "--listen").host,
        listen_address(config.device_listen, "--device-listen").host,
    ]
    return FleetSecurity(
        Path(config.security_dir),
        list(config.tls_names) or default_tls_names(hosts),
        config.tls_cert,
        config.tls_key,
    )
