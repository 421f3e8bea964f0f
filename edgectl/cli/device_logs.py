"""The work behind `edgectl devices logs ID [--since 10m] [--follow]`: a device's recent lines, over MQTT.

The control plane asks the agent (admin token only; every call is audited); the agent answers
from its bounded ring of recent lines, secrets already redacted. ``--follow`` asks again every
few seconds for what is newer than the last line shown.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import typer

from edgectl.cli.output import err_console
from edgectl.cli.remote import connect
from edgectl.control_plane.strategy import parse_duration
from edgectl.errors import UsageError
from edgectl.protos.v1 import fleet_pb2

FOLLOW_INTERVAL_S = 2.0


def _show(line: fleet_pb2.LogLine, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"at": line.at, "level": line.level, "logger": line.logger, "text": line.text}))
        return
    when = datetime.fromtimestamp(line.at, timezone.utc).isoformat(timespec="milliseconds")
    # plain echo: a device's text is printed as it is, never read as rich markup, never wrapped
    typer.echo(f"{when} {line.level.upper():<7} {line.logger}: {line.text}")


def print_device_logs(device_id: str, since: str, follow: bool, lines: int, as_json: bool,
                      server: str | None, token: str | None, ca: Path | None) -> None:  # fmt: skip
    """What `edgectl devices logs` does; Ctrl-C ends ``follow`` with success."""
    seconds = parse_duration(since)
    if seconds <= 0:
        raise UsageError(f"--since {since} must be positive", hint="e.g. --since 10m")
    try:
        _print_logs(device_id, time.time() - seconds, lines, follow, as_json, server, token, ca)
    except KeyboardInterrupt:
        return


def _print_logs(device_id: str, after: float, lines: int, follow: bool, as_json: bool,
                server: str | None, token: str | None, ca: Path | None) -> None:  # fmt: skip
    shown: set[tuple[float, str]] = set()
    with connect(server, token, ca) as client:
        while True:
            request = fleet_pb2.DeviceLogsRequest(device_id=device_id, since_unix=after, max_lines=lines)
            answer = client.call(client.fleet.DeviceLogs, request, timeout=40)
            fresh = [ln for ln in answer.lines if (ln.at, ln.text) not in shown]
            if answer.truncated and not shown and not as_json:
                err_console.print(f"[dim](older lines left out: showing the newest {len(fresh)})[/]")
            for line in fresh:
                _show(line, as_json)
            if fresh:
                after = fresh[-1].at  # the next ask starts at the last line shown (its twins are skipped)
                shown = {(ln.at, ln.text) for ln in fresh if ln.at == after}
            if not follow:
                return
            time.sleep(FOLLOW_INTERVAL_S)
