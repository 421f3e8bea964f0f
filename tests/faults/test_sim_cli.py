"""`edgectl sim run`: a simulated fleet of real agents from the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from edgectl.agent.config import CREDENTIALS_FILE
from tests.harness.fleet import FleetRig, wait_for


def sim_argv() -> list[str]:
    """`python -m edgectl sim` once the root CLI mounts the sim app; the app directly until then."""
    from edgectl.cli import app
    from edgectl.cli.sim import app as sim_app

    if any(g.typer_instance is sim_app for g in app.registered_groups):
        return [sys.executable, "-m", "edgectl", "sim"]
    return [sys.executable, "-c", "from edgectl.cli.sim import app; app()"]


def test_sim_run_enrolls_real_agents_and_stops_them_on_interrupt(rig: FleetRig, tmp_path: Path) -> None:
    """Promise: `edgectl sim run` enrolls each device with its own one-time token (credentials
    kept 0600 in its own data dir), runs them as agents the control plane sees online with their
    labels, and on Ctrl-C stops them cleanly (each says offline) and exits 0."""
    root = tmp_path / "sim"
    argv = [*sim_argv(), "run", "--devices", "3", "--server", rig.cp.address, "--labels", "fleet=cli",
            "--prefix", "cli", "--per-process", "2", "--root", str(root), "--heartbeat", "2"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ids = [f"cli-{i:05d}" for i in range(3)]
        wait_for(
            lambda: all(d.online and d.labels.get("fleet") == "cli" for i, d in rig.devices().items() if i in ids)
            and set(ids) <= set(rig.devices()),
            90, what="3 simulated devices online", interval=0.5,
        )  # fmt: skip
        for i in ids:
            assert os.stat(root / "devices" / i / CREDENTIALS_FILE).st_mode & 0o077 == 0
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, out
        assert "3 simulated devices (3 newly enrolled) in 2 worker process(es)" in out
        wait_for(lambda: not any(rig.devices()[i].online for i in ids), 30, what="the devices to say offline")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
