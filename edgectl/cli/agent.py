"""`edgectl agent run` and `edgectl infer`: thin commands over ``edgectl.agent``.

Heavy imports (onnxruntime, grpc, paho) happen inside the commands, so `edgectl --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from edgectl.client import ENROLL_TOKEN_ENV
from edgectl.errors import UsageError
from edgectl.security.files import private_umask

app = typer.Typer(help="Run the device agent (reconcile, verify, serve KServe V2, burst).")


def _enroll_token(flag: str | None, path: Path | None) -> str | None:
    """The one-time token from the env, a file, or (deprecated: any local user reads argv) the flag."""
    if any(a == "--enroll-token" or a.startswith("--enroll-token=") for a in sys.argv):
        logging.getLogger("edgectl.agent").warning(
            "--enroll-token puts the token in the process list (/proc/PID/cmdline); "
            "set %s or pass --enroll-token-file instead",
            ENROLL_TOKEN_ENV,
        )
    if path is None:
        return flag
    if flag:
        raise UsageError(f"pass the enrollment token once: --enroll-token-file or ${ENROLL_TOKEN_ENV}")
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise UsageError(f"cannot read --enroll-token-file {path}: {exc.strerror}") from exc


@app.callback()
def _agent() -> None:
    """Keeps `run` a named subcommand (typer would collapse a one-command app)."""


@app.command("run")
def run(
    device_id: str | None = typer.Option(None, envvar="EDGECTL_DEVICE_ID", help="this device's id"),
    mqtt: str | None = typer.Option(
        None,
        envvar="EDGECTL_MQTT",
        help="broker URL mqtt://H:P [default: credentials, else mqtt://127.0.0.1:1883]",
    ),
    control_plane: str | None = typer.Option(
        None, envvar="EDGECTL_SERVER", help="control plane gRPC H:P [default 127.0.0.1:7443]"
    ),
    data_dir: Path | None = typer.Option(
        None,
        envvar="EDGECTL_AGENT_DATA_DIR",
        help="artifacts, chunk store and state [default /var/lib/edgectl]",
    ),
    listen: str | None = typer.Option(
        None, envvar="EDGECTL_LISTEN", help="KServe V2 gRPC listen H:P [default 127.0.0.1:8001]"
    ),
    http_listen: str | None = typer.Option(
        None,
        envvar="EDGECTL_HTTP_LISTEN",
        help="also serve KServe V2 over HTTP/REST on H:P (Triton's 8000) [default off]",
    ),
    max_request_mib: int | None = typer.Option(
        None, help="refuse larger inference requests, MiB [default 64]"
    ),
    keep_versions: int | None = typer.Option(
        None,
        help="versions of a model kept live, addressable by number; the newest is the default [default 1]",
    ),
    tls_cert: Path | None = typer.Option(
        None, help="serve the inference ports over TLS with this certificate"
    ),
    tls_key: Path | None = typer.Option(None, help="private key of --tls-cert (file mode 0600)"),
    tls_fleet: bool | None = typer.Option(
        None, "--tls-fleet", help="serve over TLS with the certificate issued at enrollment (fleet CA)"
    ),
    tls_client_ca: Path | None = typer.Option(None, help="require client certificates from this CA (mTLS)"),
    token_file: Path | None = typer.Option(
        None,
        envvar="EDGECTL_TOKEN_FILE",
        help="require this bearer token (file mode 0600) on the inference ports",
    ),
    burst: str | None = typer.Option(None, envvar="EDGECTL_BURST", help="remote V2 endpoint H:P to burst to"),
    burst_ca: Path | None = typer.Option(
        None, help="TLS to the burst endpoint, trusting this CA certificate"
    ),
    burst_token_file: Path | None = typer.Option(
        None, help="bearer token for the burst endpoint, from a file (mode 0600); needs TLS"
    ),
    burst_cert: Path | None = typer.Option(None, help="client certificate for the burst endpoint (mTLS)"),
    burst_key: Path | None = typer.Option(None, help="private key of --burst-cert (file mode 0600)"),
    burst_price_per_1k: float | None = typer.Option(None, help="price of 1,000 burst requests [default 0]"),
    burst_price_per_second: float | None = typer.Option(
        None, help="price of one second of burst endpoint time [default 0]"
    ),
    burst_budget: float | None = typer.Option(
        None, help="burst spending allowed per period on this device, in the prices' unit [default none]"
    ),
    burst_budget_period: float | None = typer.Option(
        None, help="seconds per budget period, aligned to the clock [default 3600]"
    ),
    burst_when_spent: str | None = typer.Option(
        None, help="once the budget is spent: local (serve/queue here) or refuse (RESOURCE_EXHAUSTED)"
    ),
    labels: str | None = typer.Option(
        None, envvar="EDGECTL_LABELS", help="k=v[,k=v] labels this device reports"
    ),
    serve_only: bool | None = typer.Option(None, "--serve-only", help="no MQTT: serve --model-dir only"),
    model_dir: Path | None = typer.Option(
        None, help="with --serve-only: an artifact, or a folder of artifacts"
    ),
    trust: list[Path] | None = typer.Option(None, help="trusted public key file or folder (repeatable)"),
    fleet_key: list[Path] | None = typer.Option(
        None,
        "--fleet-key",
        help="public key that signs desired states (repeatable); enrollment hands it over, this pins "
        "it on a device enrolled before (used while DATA_DIR has no fleet-keys.json)",
    ),
    profile: str | None = typer.Option(
        None, envvar="EDGECTL_PROFILE", help="device profile name or .yaml [default: detect]"
    ),
    transport: str | None = typer.Option(None, help="artifact transport: auto | grpc | mqtt"),
    blob_urls: str | None = typer.Option(
        None, help="chunks by presigned blob-store URL when offered: https | any (http too) | off"
    ),
    blob_ca: Path | None = typer.Option(
        None, help="CA file for the blob store's HTTPS [default: system CAs]"
    ),
    bandwidth_limit: float | None = typer.Option(
        None, "--max-bandwidth", "--bandwidth-limit", help="artifact download limit, bytes per second"
    ),
    min_free_disk_mib: int | None = typer.Option(
        None, help="refuse to start a download that would leave less free disk, MiB [default 64]"
    ),
    max_batch_size: int | None = typer.Option(
        None, help="micro-batch limit: the most rows one combined run takes [default 8]"
    ),
    max_request_rows: int | None = typer.Option(
        None,
        help="the most rows one request may carry (the ModelConfig's max_batch_size; a request above it "
        "is refused as Triton refuses it) [default 1024]",
    ),
    max_queue_delay_ms: float | None = typer.Option(None, help="longest wait to fill a batch [default 2]"),
    slo_ms: float | None = typer.Option(
        None, help="latency SLO, ms: requests predicted to take over 0.8x it burst [default 100]"
    ),
    drift_threshold: float | None = typer.Option(
        None, help="input drift (PSI vs. the calibration set) that raises a DRIFT event [default 0.25]"
    ),
    heartbeat_s: float | None = typer.Option(
        None,
        "--heartbeat",
        help="seconds between looks at the device's state; a change is reported at once [default 30]",
    ),
    idle_report_s: float | None = typer.Option(
        None,
        "--idle-report",
        help="a report that changes nothing is re-sent only this often: liveness is the broker's keepalive "
        "and Will [default 300]",
    ),
    progress_interval_s: float | None = typer.Option(
        None,
        "--progress-interval",
        help="a download reports its progress at 25/50/75 %, at most once per this many seconds [default 10]",
    ),
    intra_op_threads: int | None = typer.Option(None, help="onnxruntime threads per session (0: all cores)"),
    memory_limit_mib: int | None = typer.Option(None, help="memory for models, MiB [default: the profile's]"),
    metrics_listen: str | None = typer.Option(None, "--metrics", help="serve Prometheus /metrics on H:P"),
    enroll_token: str | None = typer.Option(
        None,
        envvar=ENROLL_TOKEN_ENV,
        help=f"one-time token from `edgectl devices enroll`; set it in ${ENROLL_TOKEN_ENV} or use "
        "--enroll-token-file (as a flag it shows in the process list: deprecated)",
    ),
    enroll_token_file: Path | None = typer.Option(
        None, help="file holding the one-time enrollment token (read once, when DATA_DIR has no credentials)"
    ),
    enroll_server: str | None = typer.Option(
        None, help="control plane's TLS listener H:P for enrollment [default: --control-plane]"
    ),
    ca_file: Path | None = typer.Option(
        None, envvar="EDGECTL_CA", help="fleet CA certificate (checks the control plane at enrollment)"
    ),
    config: Path | None = typer.Option(
        None, "--config", envvar="EDGECTL_AGENT_CONFIG", help="YAML/JSON settings file"
    ),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    log_format: str = typer.Option("text", help="text or json (one object per line, for collectors)"),
) -> None:
    """Converge to the desired artifact and serve it over KServe V2.

    Example: edgectl agent run --device-id cam-07 --mqtt mqtt://broker:1883 --control-plane cp:7443 --data-dir /var/lib/edgectl

    Enrolled (secured fleet): EDGECTL_ENROLL_TOKEN=TOKEN edgectl agent run --device-id cam-07 --enroll-server cp:7443 --ca-file ca.crt --control-plane cp:7444 --data-dir /var/lib/edgectl
    """
    from edgectl.logs import configure

    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"--log-format {log_format!r} must be text or json")
    configure(log_format, log_level)
    enroll_token = _enroll_token(enroll_token, enroll_token_file)
    from edgectl.agent.agent import Agent
    from edgectl.agent.config import load_config

    overrides: dict[str, Any] = {
        "device_id": device_id,
        "mqtt": mqtt,
        "control_plane": control_plane,
        "data_dir": data_dir,
        "listen": listen,
        "http_listen": http_listen,
        "max_request_mib": max_request_mib,
        "keep_versions": keep_versions,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_fleet": tls_fleet,
        "tls_client_ca": tls_client_ca,
        "token_file": token_file,
        "burst": burst,
        "burst_ca": burst_ca,
        "burst_token_file": burst_token_file,
        "burst_cert": burst_cert,
        "burst_key": burst_key,
        "burst_price_per_1k": burst_price_per_1k,
        "burst_price_per_second": burst_price_per_second,
        "burst_budget": burst_budget,
        "burst_budget_period_s": burst_budget_period,
        "burst_when_spent": burst_when_spent,
        "labels": labels or None,
        "serve_only": serve_only,
        "model_dir": model_dir,
        "trust": tuple(trust) if trust else None,
        "fleet_key": tuple(fleet_key) if fleet_key else None,
        "profile": profile,
        "transport": transport,
        "blob_urls": blob_urls,
        "blob_ca": blob_ca,
        "bandwidth_limit": bandwidth_limit,
        "min_free_disk_mib": min_free_disk_mib,
        "max_batch_size": max_batch_size,
        "max_request_rows": max_request_rows,
        "max_queue_delay_ms": max_queue_delay_ms,
        "slo_ms": slo_ms,
        "drift_threshold": drift_threshold,
        "heartbeat_s": heartbeat_s,
        "idle_report_s": idle_report_s,
        "progress_interval_s": progress_interval_s,
        "intra_op_threads": intra_op_threads,
        "memory_limit_mib": memory_limit_mib,
        "metrics_listen": metrics_listen,
        "enroll_token": enroll_token,
        "enroll_server": enroll_server,
        "ca_file": ca_file,
    }
    with private_umask():  # keys, credentials, state and downloads: this device's user only
        Agent(load_config(config, overrides)).run_forever()
