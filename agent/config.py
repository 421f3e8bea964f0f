"""Typed agent settings, loaded once: defaults < config file (YAML/JSON) < environment/flags.

The CLI passes only the options the user actually gave (flag or ``EDGECTL_*`` env), so a config
file fills the rest. ``credentials.json`` in the data dir (written at enrollment) supplies the
MQTT identity and the trusted artifact keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from edgectl.addresses import AddressError, parse_host_port, parse_mqtt_url
from edgectl.agent.errors import ConfigError
from edgectl.artifact import KeyFileError, TrustStore
from edgectl.artifact.signing import load_public_key
from edgectl.labels import LabelError, check_labels, parse_labels
from edgectl.mqtt.wire import DeviceIdError, check_device_id
from edgectl.protos.v1 import fleet_pb2 as fpb
from edgectl.security.files import check_private

CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class AgentConfig:
    """Everything `edgectl agent run` can be told; defaults run on one machine."""

    device_id: str = ""
    mqtt: str | None = None  # None: credentials.json, else mqtt://127.0.0.1:1883
    control_plane: str | None = "127.0.0.1:7443"
    data_dir: Path = Path("/var/lib/edgectl")
    listen: str = "127.0.0.1:8001"
    # V2 over HTTP/REST (Triton's 8000): off unless asked, a device opens no port it does not need.
    http_listen: str | None = None
    max_request_mib: int = 64  # larger inference requests are refused before they are read
    keep_versions: int = 1  # versions of a model name kept live; the newest is the default
    # TLS and credentials on the inference listeners (gRPC and HTTP).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_fleet: bool = False  # serve with the certificate issued at enrollment (fleet CA)
    tls_client_ca: Path | None = None  # require client certificates from this CA (mTLS)
    token_file: Path | None = None  # require "authorization: Bearer <token>" (file 0600)
    burst: str | None = None
    burst_ca: Path | None = None  # TLS to the burst endpoint, trusting this CA
    burst_token_file: Path | None = None  # bearer token sent to the burst endpoint (file 0600)
    burst_cert: Path | None = None  # client certificate for the burst endpoint (mTLS)
    burst_key: Path | None = None
    # What the burst endpoint costs, and the per-device budget per period (None: unlimited).
    burst_price_per_1k: float = 0.0
    burst_price_per_second: float = 0.0
    burst_budget: float | None = None
    burst_budget_period_s: float = 3600.0
    burst_when_spent: str = "local"  # local (serve/queue here) | refuse (RESOURCE_EXHAUSTED)
    labels: dict[str, str] = field(default_factory=dict)
    serve_only: bool = False
    model_dir: Path | None = None
    trust: tuple[Path, ...] = ()
    # Public keys that sign desired states, for a data dir without fleet-keys.json (enrollment
    # hands them over; this pins them on a device enrolled before desired states were signed).
    fleet_key: tuple[Path, ...] = ()
    profile: str | None = None  # a profile name or .yaml; None: detect from the host
    heartbeat_s: float = 30.0
    # A report that would repeat the last one (all but its timestamp) is sent at most this often;
    # liveness is the broker's (keepalive and the Will), what changes is sent at once.
    idle_report_s: float = 300.0
    # A download reports FETCH_PROGRESS at its quarter marks, at most once per this many seconds.
    progress_interval_s: float = 10.0
    transport: str = "auto"  # auto (gRPC, then MQTT chunks) | grpc | mqtt
    # With auto/grpc: chunks by presigned blob-store URL when the control plane offers them
    # (https only | any: plain http too, for a LAN object store | off), else through gRPC.
    blob_urls: str = "https"
    blob_ca: Path | None = None  # CA of the blob store's HTTPS; None: the system's CAs
    bandwidth_limit: float | None = None  # bytes per second (--max-bandwidth)
    min_free_disk_mib: int = 64  # a download that would leave less free space is not started
    max_batch_size: int = 8
    max_request_rows: int = 1024  # the most rows one request may carry (Triton's max_batch_size)
    max_queue_delay_ms: float = 2.0
    slo_ms: float = 100.0
    # Input drift (PSI against the artifact's calibration summary) at which a DRIFT event is raised.
    drift_threshold: float = 0.25
    burst_timeout_s: float = 2.0
    intra_op_threads: int = 0
    memory_limit_mib: int | None = None
    metrics_listen: str | None = None
    log_level: str = "info"
    enroll_token: str | None = field(default=None, repr=False)  # one-time; used when not yet enrolled
    enroll_server: str | None = None  # the control plane's TLS listener; None: control_plane
    ca_file: Path | None = None  # the fleet CA, to check the control plane's certificate at enrollment

    def validate(self) -> AgentConfig:
        """Raise ConfigError for values that cannot work; return self."""
        if not self.serve_only:
            if not self.device_id:
                raise ConfigError("--device-id is required", hint="or set EDGECTL_DEVICE_ID")
            try:
                check_device_id(self.device_id)
            except DeviceIdError as exc:
                raise ConfigError(str(exc)) from exc
        if self.serve_only and self.model_dir is None:
            raise ConfigError("--serve-only needs --model-dir DIR (an artifact, or a folder of artifacts)")
        if self.transport not in ("auto", "grpc", "mqtt"):
            raise ConfigError(f"--transport must be auto, grpc or mqtt, got {self.transport!r}")
        if self.blob_urls not in ("https", "any", "off"):
            raise ConfigError(f"--blob-urls must be https, any or off, got {self.blob_urls!r}")
        if self.burst_when_spent not in ("local", "refuse"):
            raise ConfigError(f"--burst-when-spent must be local or refuse, got {self.burst_when_spent!r}")
        for what, price in (
            ("--burst-price-per-1k", self.burst_price_per_1k),
            ("--burst-price-per-second", self.burst_price_per_second),
            ("--burst-budget", self.burst_budget or 0.0),
        ):
            if price < 0:
                raise ConfigError(f"{what} cannot be negative, got {price}")
        if self.heartbeat_s <= 0:
            raise ConfigError(f"--heartbeat must be above 0 seconds, got {self.heartbeat_s}")
        if self.idle_report_s < 0:
            raise ConfigError(
                f"--idle-report cannot be negative, got {self.idle_report_s} (0: every heartbeat)"
            )
        if self.progress_interval_s < 0:
            raise ConfigError(f"--progress-interval cannot be negative, got {self.progress_interval_s}")
        if self.burst_budget_period_s <= 0:
            raise ConfigError(f"--burst-budget-period must be positive, got {self.burst_budget_period_s}")
        if self.burst_budget is not None and not (self.burst_price_per_1k or self.burst_price_per_second):
            raise ConfigError(
                "--burst-budget needs a price to count against it",
                hint="add --burst-price-per-1k and/or --burst-price-per-second",
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if (self.burst_cert is None) != (self.burst_key is None):
            raise ConfigError("--burst-cert and --burst-key go together")
        if self.burst_token_file is not None and self.burst_ca is None and self.burst_cert is None:
            raise ConfigError(
                "a burst token is only sent over TLS", hint="add --burst-ca CA.pem (the endpoint's CA)"
            )
        for what, value in (
            ("--max-batch-size", self.max_batch_size),
            ("--max-request-rows", self.max_request_rows),
            ("--slo-ms", self.slo_ms),
            ("--drift-threshold", self.drift_threshold),
            ("--max-request-mib", self.max_request_mib),
            ("--keep-versions", self.keep_versions),
        ):
            if value <= 0:
                raise ConfigError(f"{what} must be positive, got {value}")
        addresses = (  # (flag, value, bound here rather than dialled)
            ("--listen", self.listen, True),
            ("--http-listen", self.http_listen, True),
            ("--metrics", self.metrics_listen, True),
            ("--burst", self.burst, False),
            ("--control-plane", self.control_plane, False),
            ("--enroll-server", self.enroll_server, False),
        )
        try:
            for what, addr, bound in addresses:
                if addr is not None:
                    parse_host_port(addr, what=what, listen=bound)
            if self.mqtt:
                parse_mqtt_url(self.mqtt)
        except AddressError as exc:
            raise ConfigError(exc.args[0], hint=exc.hint) from exc
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}
_PATHS = {
    "data_dir", "model_dir", "ca_file", "tls_cert", "tls_key", "tls_client_ca", "token_file",
    "burst_ca", "burst_token_file", "burst_cert", "burst_key", "blob_ca",
}  # fmt: skip


def _coerce(name: str, value: Any) -> Any:
    if name in _PATHS and value is not None:
        return Path(value).expanduser()
    if name in ("trust", "fleet_key"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(Path(v).expanduser() for v in items)
    if name == "labels":
        return _labels(value)
    return value


def _labels(value: Any) -> dict[str, str]:
    """Labels from a flag (``k=v,k=v``) or a config file mapping, by the fleet's one label rule."""
    try:
        if isinstance(value, str):
            return parse_labels(value)
        if not isinstance(value, dict):
            raise ConfigError(f"labels must be k=v,k=v or a mapping, got {type(value).__name__}")
        return check_labels({str(k): str(v) for k, v in value.items()})
    except LabelError as exc:
        raise ConfigError(f"labels: {exc.args[0]}", hint=exc.hint) from exc


def load_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Merge the config file (if any) under ``overrides`` (flags and env) into a validated AgentConfig."""
    values: dict[str, Any] = {}
    if file is not None:
        try:
            raw = (
                yaml.safe_load(file.read_text())
                if file.suffix in (".yaml", ".yml")
                else json.loads(file.read_text())
            )
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {file} must hold a mapping of settings")
        values.update({k.replace("-", "_"): v for k, v in raw.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown settings {unknown}; known: {sorted(_FIELDS)}")
    return AgentConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def read_credentials(data_dir: Path) -> fpb.DeviceCredentials | None:
    """The enrollment credentials in the data dir, or None when there are none."""
    path = data_dir / CREDENTIALS_FILE
    if not path.is_file():
        return None
    creds = fpb.DeviceCredentials()
    try:
        json_format.Parse(path.read_text(), creds, ignore_unknown_fields=True)
    except (OSError, json_format.ParseError) as exc:
        raise ConfigError(f"{path} is not DeviceCredentials JSON: {exc}") from exc
    check_private(path, "device credentials", error=ConfigError)
    return creds


def build_trust(config: AgentConfig, creds: fpb.DeviceCredentials | None) -> TrustStore:
    """Trusted artifact keys: --trust paths, the credentials' keys, and ``<data_dir>/trusted/``."""
    store = TrustStore()
    try:
        for path in config.trust:
            store.add_path(path)
        for i, pem in enumerate(creds.trusted_keys if creds else []):
            store.add(load_public_key(bytes(pem), f"{CREDENTIALS_FILE} key {i}"))
        extra = config.data_dir / "trusted"
        if extra.is_dir() and any(extra.iterdir()):
            store.add_path(extra)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    if not len(store):
        raise ConfigError(
            "no trusted artifact keys: every artifact would be refused",
            hint="pass --trust KEY.pub.pem, enroll the device, or put keys in DATA_DIR/trusted/",
        )
    return store
