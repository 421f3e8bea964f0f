"""Security v2, row 16: secrets at rest and in the process list, on a real `edgectl up --detach`.

The attack: a second local user reads the control plane's state (state.db and its WAL were
0644), reads an agent's enrollment token from /proc/PID/cmdline, or the owner runs with key
files others can read. Positive controls: the fleet enrolls and runs, and 0600 keys load.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.control_plane.security import BrokerCredentials, FleetSecurity
from edgectl.endpoints import Endpoints
from edgectl.localfleet import stop_detached
from edgectl.security.broker_files import write_broker_files
from edgectl.security.errors import SecurityError
from edgectl.security.tokens import Role, TokenIssuer
from tests.conftest import require_mosquitto


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Path]:
    """`edgectl up --detach --agents 0` (the control plane, the broker and the cloud agent)."""
    require_mosquitto()
    data = tmp_path / "home"
    env = {**os.environ, "EDGECTL_CONFIG_DIR": str(tmp_path / "config"), "EDGECTL_DATA_DIR": str(data)}
    result = subprocess.run([sys.executable, "-m", "edgectl", "up", "--detach", "--agents", "0", "--data-dir",
                             str(data), "--json"], capture_output=True, text=True, timeout=180, env=env)  # fmt: skip
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        yield data
    finally:
        if (data / "endpoints.json").exists():
            stop_detached(data)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_row16_state_keys_and_tokens_stay_private(up: Path) -> None:
    endpoints = Endpoints.read(up)
    cloud = up / "agents" / "cloud"
    assert (cloud / "credentials.json").exists()  # positive control: the agent enrolled and runs
    state = up / "control-plane" / "state.db"
    private = [state, *state.parent.glob("state.db-*"), cloud / "credentials.json", cloud / "device.key",
               up / "security" / "token.key", up / "security" / "ca.key", up / "admin.token",
               *(up / "logs").iterdir()]  # fmt: skip
    assert any(p.name == "state.db-wal" for p in private), "the WAL should exist while the control plane runs"
    for path in private:
        assert _mode(path) & 0o077 == 0, f"{path} is {_mode(path):o}: other users can read it"
    for directory in (up / "control-plane" / "blobs", cloud):
        assert _mode(directory) & 0o077 == 0, f"{directory} is {_mode(directory):o}"

    pid = endpoints.pids["cloud"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = dict(
        line.split(b"=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line
    )
    token = environ[b"EDGECTL_ENROLL_TOKEN"]  # handed over in the env (readable by its user only) ...
    assert len(token) > 20 and b"--enroll-token" not in cmdline
    assert not any(token in arg for arg in cmdline)  # ... never in argv, which every local user reads
    assert _mode(Path(f"/proc/{pid}")) & 0o077 and _mode(Path(f"/proc/{pid}/environ")) & 0o077 == 0


def test_row16_key_files_others_can_read_are_refused(tmp_path: Path) -> None:
    layout = write_broker_files(tmp_path / "sec", hostnames=["127.0.0.1"], host="127.0.0.1", port=8883,
                                plugin=Path("/dev/null"))  # fmt: skip
    token_key = layout.directory / "token.key"
    issuer = TokenIssuer.load_or_create(token_key)  # positive control: made 0600, loads
    assert issuer.verifier().verify(issuer.issue("me", Role.VIEWER)).subject == "me"
    FleetSecurity(layout.directory, ["127.0.0.1"])
    BrokerCredentials.load(layout.credentials_file)
    for secret, load in (
        (token_key, lambda: TokenIssuer.load_or_create(token_key)),
        (layout.directory / "ca.key", lambda: FleetSecurity(layout.directory, ["127.0.0.1"])),
        (layout.credentials_file, lambda: BrokerCredentials.load(layout.credentials_file)),
    ):
        os.chmod(secret, 0o644)
        with pytest.raises(SecurityError) as info:
            load()
        assert "readable by other users" in str(info.value) and info.value.hint == f"run: chmod 600 {secret}"
        os.chmod(secret, 0o600)
        load()


def test_row16_the_agent_reads_its_token_from_a_file_or_the_env(tmp_path: Path) -> None:
    """`agent run --enroll-token-file` and EDGECTL_ENROLL_TOKEN reach enrollment; no server, so it fails there."""
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    base = [sys.executable, "-m", "edgectl", "agent", "run", "--device-id", "cam-f", "--data-dir",
            str(tmp_path / "agent"), "--enroll-server", "127.0.0.1:1", "--control-plane", "127.0.0.1:1",
            "--ca-file", str(tmp_path / "missing-ca.crt")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "EDGECTL_ENROLL_TOKEN"}
    for extra, extra_env in (
        (["--enroll-token-file", str(token_file)], {}),
        ([], {"EDGECTL_ENROLL_TOKEN": "tok-from-env"}),
    ):
        done = subprocess.run(
            [*base, *extra], capture_output=True, text=True, timeout=60, env={**env, **extra_env}
        )
        assert done.returncode != 0 and "--ca-file" in done.stderr, done.stderr[
            -2000:
        ]  # enrollment was tried
        assert "process list" not in done.stderr
    flagged = subprocess.run([*base, "--enroll-token", "tok-in-argv"], capture_output=True, text=True, timeout=60,
                             env=env)  # fmt: skip
    assert "process list" in flagged.stderr  # the old flag still works, with a warning
    both = subprocess.run([*base, "--enroll-token-file", str(token_file)], capture_output=True, text=True,
                          timeout=60, env={**env, "EDGECTL_ENROLL_TOKEN": "x"})  # fmt: skip
    assert both.returncode != 0 and "once" in both.stderr
