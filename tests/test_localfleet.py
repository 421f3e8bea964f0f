"""`edgectl up` / `edgectl down`: a whole fleet on one machine, as real processes, and nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.client import ControlPlaneClient, RemoteError, resolve_credentials
from edgectl.endpoints import Endpoints, LocalFleetError
from edgectl.localfleet import stop_detached
from edgectl.protos.v1 import fleet_pb2
from tests.conftest import require_mosquitto


def _edgectl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgectl", *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is not alive for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def _devices_online(data: Path, want: set[str], timeout: float = 30.0) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    address = Endpoints.read(data).control_plane
    with ControlPlaneClient(address, credentials=resolve_credentials(data_dir=data)) as client:
        while True:
            devices = client.call(client.fleet.ListDevices, fleet_pb2.ListDevicesRequest()).devices
            online = {d.id: d.online for d in devices}
            if all(online.get(d) for d in want) or time.monotonic() > deadline:
                return online
            time.sleep(0.3)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment for `edgectl` subprocesses; whatever fleet a failed test left running is stopped."""
    require_mosquitto()
    yield {
        **os.environ,
        "EDGECTL_CONFIG_DIR": str(tmp_path / "config"),
        "EDGECTL_DATA_DIR": str(tmp_path / "home"),
    }
    for endpoints in tmp_path.rglob("endpoints.json"):  # the fleet's processes live in their own sessions
        with contextlib.suppress(LocalFleetError):
            stop_detached(endpoints.parent, grace_s=5)


def test_up_detached_lists_endpoints_agents_report_and_down_stops_everything(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Promise: `up --detach` returns once every part listens and reports; `down` leaves no process behind."""
    data = tmp_path / "fleet"
    result = _edgectl("up", "--detach", "--agents", "2", "--data-dir", str(data), "--json", env=env)
    assert result.returncode == 0, result.stderr
    endpoints = Endpoints.read(data)
    shown = json.loads(result.stdout)
    assert shown["control_plane"] == endpoints.control_plane and endpoints.secure
    assert [a.device_id for a in endpoints.agents] == ["edge-1", "edge-2"]
    try:
        online = _devices_online(data, {"edge-1", "edge-2", "cloud"})
        assert online == {"edge-1": True, "edge-2": True, "cloud": True}
        # secured by default: each agent enrolled and keeps its own credentials, 0600
        for device in ("edge-1", "edge-2", "cloud"):
            assert (data / "agents" / device / "credentials.json").stat().st_mode & 0o077 == 0
        assert Path(str(endpoints.token_file)).stat().st_mode & 0o077 == 0
        # the CLI finds the CA and the admin token through endpoints.json; without them it is refused
        listed = _edgectl("devices", "ls", "--json", env={**env, "EDGECTL_DATA_DIR": str(data)})
        assert listed.returncode == 0, listed.stderr
        assert {d["id"] for d in json.loads(listed.stdout)} == {"edge-1", "edge-2", "cloud"}
        with ControlPlaneClient(endpoints.control_plane) as plaintext, pytest.raises(RemoteError):
            plaintext.call(plaintext.fleet.ListDevices, fleet_pb2.ListDevicesRequest(), timeout=5)
        # the default signing key of this user is what the fleet trusts
        assert (data / "trusted" / "default.pub.pem").read_bytes() == (
            tmp_path / "config" / "keys" / "default.pub.pem"
        ).read_bytes()
        again = _edgectl("up", "--detach", "--data-dir", str(data), env=env)
        assert again.returncode != 0 and "already runs" in " ".join(again.stderr.split())
    finally:
        down = _edgectl("down", "--data-dir", str(data), env=env)
    assert down.returncode == 0, down.stderr
    assert "control-plane" in down.stdout and "broker" in down.stdout
    assert not any(_alive(pid) for pid in endpoints.pids.values())
    assert not (data / "endpoints.json").exists()
    with pytest.raises(LocalFleetError, match="no local fleet"):
        stop_detached(data)


def test_up_in_the_foreground_stops_cleanly_on_ctrl_c(tmp_path: Path, env: dict[str, str]) -> None:
    """Promise: Ctrl-C (SIGINT) on `edgectl up` stops the broker, control plane and agents, exit 0."""
    data = tmp_path / "fleet"
    proc = subprocess.Popen([sys.executable, "-m", "edgectl", "up", "--agents", "1", "--data-dir", str(data)],
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    errors: list[str] = []
    # Threads read both pipes: select() on a pipe misses lines the text reader has already buffered,
    # which left the wait spinning until its deadline although `up` had said it was ready.
    readers = [
        threading.Thread(target=lambda out=out, pipe=pipe: out.extend(iter(pipe.readline, "")), daemon=True)
        for out, pipe in ((lines, proc.stdout), (errors, proc.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops the fleet" not in "".join(lines):  # up says so once everything is up
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        endpoints = Endpoints.read(data)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
        err = "".join(errors)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not any(_alive(pid) for pid in endpoints.pids.values())
    assert not (data / "endpoints.json").exists()


def test_up_refuses_a_missing_trusted_key(tmp_path: Path, env: dict[str, str]) -> None:
    result = _edgectl("up", "--detach", "--data-dir", str(tmp_path / "f"), "--trust", str(tmp_path / "nope.pub.pem"),
                      env=env)  # fmt: skip
    assert result.returncode != 0
    assert "nope.pub.pem does not exist" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
