"""The work behind `edgectl devices bundle ID`: one device's support bundle, as a .tar.gz.

The agent's half (config without secrets, versions, doctor report) and its recent lines come over
the logs channel (admin only, audited, bounded, redacted on the device and again by the control
plane); the control plane's view of the device is what `devices describe` shows.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import typer

from edgectl.cli.devices import describe_data
from edgectl.cli.remote import connect
from edgectl.errors import EdgectlError, UsageError
from edgectl.protos.v1 import fleet_pb2
from edgectl.redact import redact

BUNDLE_TIMEOUT_S = 30.0  # the doctor's checks run on the device before it answers


class DeviceOfflineError(EdgectlError):
    """The device is offline: its agent cannot answer for the bundle."""

    exit_code = 7  # not possible in the current state (docs/cli.md's table)


def log_text(lines: list[fleet_pb2.LogLine]) -> str:
    """Lines as `devices logs` prints them."""
    out = []
    for line in lines:
        when = datetime.fromtimestamp(line.at, timezone.utc).isoformat(timespec="milliseconds")
        out.append(f"{when} {line.level.upper():<7} {line.logger}: {line.text}\n")
    return "".join(out)


def _add(tar: tarfile.TarFile, name: str, text: str, mtime: float) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o600
    tar.addfile(info, io.BytesIO(data))


def write_bundle(device_id: str, out: Path | None, server: str | None, token: str | None,
                 ca: Path | None) -> Path:  # fmt: skip
    """Fetch everything, then write the archive (nothing is written when a part cannot be had)."""
    now = time.time()
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out or Path(f"bundle-{device_id}-{stamp}.tar.gz")
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory", hint="name the .tar.gz file to write")
    with connect(server, token, ca) as client:
        device, described = describe_data(client, device_id, rollouts=20)
        if not device.online:  # its Last Will (or it never came up): fail now, not after a timeout
            seen = device.last_seen.ToJsonString() if device.HasField("last_seen") else "never"
            raise DeviceOfflineError(
                f"device {device_id} is offline (last seen: {seen}); a bundle needs its agent to answer",
                hint="bring it back online, then retry; `edgectl devices describe` shows what the control plane knows",
            )
        request = fleet_pb2.DeviceLogsRequest(
            device_id=device_id, bundle=True, timeout_seconds=BUNDLE_TIMEOUT_S
        )
        answer = client.call(client.fleet.DeviceLogs, request, timeout=BUNDLE_TIMEOUT_S + 10)
    agent = json.loads(answer.bundle_json)
    agent["logs_truncated"] = answer.truncated
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        # device.json is the control plane's own data, but labels and errors come from devices: redact
        _add(tar, "device.json", redact(json.dumps(described, indent=2, sort_keys=True)) + "\n", now)
        _add(tar, "agent.json", json.dumps(agent, indent=2, sort_keys=True) + "\n", now)
        _add(tar, "logs.txt", log_text(list(answer.lines)), now)
    typer.echo(f"wrote {path} (device.json, agent.json, logs.txt: {len(answer.lines)} lines)")
    return path
