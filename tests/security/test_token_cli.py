"""`edgectl control-plane token`: a wrong --role or --ttl is the user's input to fix (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def edgectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgectl", *args], capture_output=True, text=True, timeout=60
    )


def test_a_wrong_role_or_lifetime_exits_2_with_one_line(tmp_path: Path) -> None:
    security = tmp_path / "fleet"
    assert edgectl("control-plane", "init", "--security-dir", str(security)).returncode == 0
    mint = ["control-plane", "token", "--subject", "alice", "--security-dir", str(security)]
    for flags, message in (
        (["--role", "god"], "use viewer, deployer or admin"),
        (["--role", "device"], "not tokens"),
        (["--ttl", "0s"], "lifetime must be positive"),
        (["--ttl", "9000h"], "at most"),
    ):
        done = edgectl(*mint, *flags)
        assert done.returncode == 2 and message in " ".join(done.stderr.split()), (flags, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr
    ok = edgectl(*mint, "--role", "deployer")
    assert ok.returncode == 0 and ok.stdout.strip()
