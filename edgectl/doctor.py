"""``edgectl doctor``: what this machine can run, and whether the broker answers.

It reports and never fails for a missing GPU: a CPU-only box is a supported target.
Every check is real: the CUDA driver is asked through libcuda, the broker gets an MQTT
CONNECT and must answer with a CONNACK.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import edgectl
from edgectl.addresses import AddressError, parse_mqtt_url
from edgectl.devices import DeviceError, HostFacts, detect, gather_facts

DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
BROKER_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class BrokerCheck:
    """The outcome of one connect to the MQTT broker."""

    url: str
    reachable: bool
    detail: str
    latency_ms: float | None = None


@dataclass(frozen=True)
class PackageCheck:
    """An optional Python package: its version, or why it is absent."""

    name: str
    version: str | None
    absent_reason: str | None


@dataclass(frozen=True)
class DoctorReport:
    """Everything ``edgectl doctor`` found; ``to_dict`` is its JSON form."""

    python_version: str
    edgectl_version: str
    platform: str
    facts: HostFacts
    profile: str | None
    profile_reason: str
    cpu_int8_features: dict[str, bool]
    torch: PackageCheck
    mqtt: BrokerCheck

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, grouped the way the table prints it."""
        f = self.facts
        return {
            "python": self.python_version,
            "edgectl": self.edgectl_version,
            "platform": self.platform,
            "cpu": {
                "arch": f.machine,
                "model": f.cpu_model,
                "int8_features": dict(self.cpu_int8_features),
            },
            "memory_total_mib": f.memory_total_mib,
            "jetson": {"detected": f.is_jetson, "model": f.device_model, "l4t_release": f.l4t_release},
            "onnxruntime": {
                "version": f.onnxruntime_version,
                "providers": list(f.onnxruntime_providers),
                "absent_reason": f.onnxruntime_absent_reason,
            },
            "cuda": {
                "driver_version": f.cuda_driver_version,
                "devices": [asdict(d) for d in f.cuda_devices],
                "absent_reason": f.cuda_absent_reason,
            },
            "tensorrt": {"version": f.tensorrt_version, "absent_reason": f.tensorrt_absent_reason},
            "torch": {"version": self.torch.version, "absent_reason": self.torch.absent_reason},
            "profile": {"name": self.profile, "reason": self.profile_reason},
            "mqtt": asdict(self.mqtt),
            "notes": list(f.notes),
        }


def _package(name: str, install_hint: str) -> PackageCheck:
    """Version of an optional package from its metadata, without importing it (torch takes seconds)."""
    if importlib.util.find_spec(name) is None:
        return PackageCheck(name, None, f"not installed ({install_hint})")
    try:
        return PackageCheck(name, importlib.metadata.version(name), None)
    except importlib.metadata.PackageNotFoundError:
        return PackageCheck(name, "unknown (installed without package metadata)", None)


def check_broker(url: str, timeout_s: float = BROKER_TIMEOUT_S) -> BrokerCheck:
    """Connect to the broker at ``url`` and wait for its CONNACK, within ``timeout_s``."""
    try:
        parsed = parse_mqtt_url(url)
    except AddressError as exc:
        return BrokerCheck(url, False, str(exc))
    host, port = parsed.host, parsed.port
    started = time.monotonic()
    if importlib.util.find_spec("paho") is None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            return BrokerCheck(url, False, f"TCP connect to {host}:{port} failed: {exc}")
        ms = (time.monotonic() - started) * 1000
        return BrokerCheck(url, True, "TCP port open; install paho-mqtt to check the MQTT handshake", ms)
    return _mqtt_handshake(url, host, port, parsed.tls, parsed.username, parsed.password, timeout_s)


def _mqtt_handshake(
    url: str, host: str, port: int, tls: bool, user: str | None, password: str | None, timeout_s: float
) -> BrokerCheck:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    outcome: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # Only record: the loop below decides, nothing blocks in the callback.
        outcome["code"] = reason_code

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"edgectl-doctor-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.connect_timeout = timeout_s
    if user:
        client.username_pw_set(user, password)
    if tls:
        client.tls_set()
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        client.connect(host, port, keepalive=max(5, int(timeout_s) + 1))
        while "code" not in outcome and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    except (OSError, ValueError) as exc:
        return BrokerCheck(url, False, f"cannot connect to {host}:{port}: {exc}")
    finally:
        try:
            client.disconnect()
        finally:
            client.loop(timeout=0.01)
            # paho keeps the socket if the CONNACK never came; close it explicitly.
            sock = client.socket()
            if sock is not None:
                sock.close()
    ms = (time.monotonic() - started) * 1000
    code = outcome.get("code")
    if code is None:
        return BrokerCheck(url, False, f"TCP connected to {host}:{port} but no CONNACK within {timeout_s:g}s")
    if code.is_failure:
        return BrokerCheck(url, False, f"broker refused the connection: {code}", ms)
    return BrokerCheck(url, True, "MQTT v5 CONNECT accepted (CONNACK success)", ms)


def run_doctor(broker_url: str | None, broker: BrokerCheck | None = None) -> DoctorReport:
    """Gather every check; ``broker_url`` defaults to $EDGECTL_MQTT, else mqtt://127.0.0.1:1883.

    ``broker``: the broker's state as the caller already knows it (a running agent), instead of a connect."""
    url = broker_url or os.environ.get("EDGECTL_MQTT") or DEFAULT_MQTT_URL
    facts = gather_facts()
    try:
        detection = detect(facts)
        profile: str | None = detection.profile.name
        reason = detection.reason
    except DeviceError as exc:
        profile, reason = None, str(exc)
    return DoctorReport(
        python_version=platform.python_version(),
        edgectl_version=edgectl.__version__,
        platform=f"{platform.system()} {platform.release()} ({sys.implementation.name})",
        facts=facts,
        profile=profile,
        profile_reason=reason,
        cpu_int8_features=facts.int8_features(),
        torch=_package("torch", "only compress needs it: pip install 'edgectl[compress]'"),
        mqtt=broker if broker is not None else check_broker(url),
    )
