"""CI and set-up: each README command sets up what it needs, and CI runs the linters.

``make -n`` prints what a target would run without running it, so these read the real
Makefile's dependency graph as a fresh machine (no venv yet) would see it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry_run(target: str, tmp_path: Path) -> str:
    venv = tmp_path / "fresh-venv"  # absent: as on a machine that never ran `make setup`
    # Run as a top-level make even inside `make test`: the outer make's MAKEFLAGS/MAKELEVEL would
    # otherwise make this one print "Entering/Leaving directory" lines around the plan.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return result.stdout


@pytest.mark.parametrize("target", ["test", "demo"])
def test_readme_command_runs_the_whole_setup_first(target: str, tmp_path: Path) -> None:
    plan = _dry_run(target, tmp_path)
    assert "-m venv" in plan, plan  # the venv
    assert "mosquitto" in plan, plan  # the broker the suite and the demo need
    assert "faketime" in plan, plan
    # ...and all of it before the command itself.
    last = plan.strip().splitlines()[-1]
    assert ("pytest" in last) if target == "test" else ("edgectl demo" in last), last


def test_setup_alone_is_the_positive_control(tmp_path: Path) -> None:
    # `lint` needs only the venv: the dry run must tell the two apart, or the test above proves nothing.
    plan = _dry_run("lint", tmp_path)
    assert "-m venv" in plan
    assert "mosquitto" not in plan


def test_ci_runs_lint_after_setup_and_before_the_suite() -> None:
    steps = [
        line.split("<")[0].strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("make ")
    ]
    assert "make lint" in steps, steps
    assert steps.index("make setup") < steps.index("make lint") < steps.index("make test"), steps


def test_setup_installs_only_from_the_hashed_lock(tmp_path: Path) -> None:
    installs = [line for line in _dry_run("setup", tmp_path).splitlines() if " install " in line]
    assert any("--require-hashes -r requirements/dev.lock" in line for line in installs), installs
    # Anything else pip installs is edgectl itself, with nothing fetched for it.
    others = [line for line in installs if "--require-hashes" not in line and "apt-get" not in line]
    assert all("--no-deps" in line and "-e ." in line for line in others), others
