"""The control plane keeps each device's latest drift score from its reported state (real mosquitto,
real control plane) and shows it: `devices ls -o wide`, `devices get -o json`, `devices describe`.
A device whose agent predates drift reporting shows none and keeps working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgectl.cli import app as APP
from edgectl.control_plane.server import ControlPlane
from edgectl.protos.v1 import mqtt_pb2
from tests.control_plane.sim_device import SimFleet, wait_for

DIGEST = "sha256:" + "ab" * 32


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(APP, list(args))
    return result.exit_code, result.stdout


def test_latest_drift_score_is_stored_and_shown(
    cp: ControlPlane, sim: SimFleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "300")
    new = sim.add("dev-new")
    new.active["mlp"] = mqtt_pb2.ActiveModel(
        name="mlp", digest=DIGEST, version=1, smoke_test_passed=True,
        drift_score=0.4213, drift_requests=1000, drift_feature="x[2]",
    )  # fmt: skip
    # An older agent: the same model, no drift fields at all.
    old = sim.add("dev-old")
    old.active["mlp"] = mqtt_pb2.ActiveModel(name="mlp", digest=DIGEST, version=1, smoke_test_passed=True)
    sim.connect()
    wait_for(lambda: len(cp.fleet.list_devices()) == 2 and cp.fleet.get("dev-new").models, 10, what="reports")
    wait_for(lambda: cp.fleet.get("dev-old").models, 10, what="old report")
    assert cp.fleet.get("dev-new").models["mlp"].drift == pytest.approx(0.4213)
    assert cp.fleet.get("dev-old").models["mlp"].drift is None

    code, out = run("devices", "get", "dev-new", "-o", "json")
    assert code == 0 and json.loads(out)["drift"] == {"mlp": pytest.approx(0.4213)}
    code, out = run("devices", "get", "dev-old", "-o", "json")
    assert code == 0 and "drift" not in json.loads(out)
    code, wide = run("devices", "ls", "-o", "wide")
    assert code == 0 and "drift" in wide and "mlp=0.42" in wide
    old_row = next(line for line in wide.splitlines() if "dev-old" in line)
    assert "mlp=" not in old_row
    code, table = run("devices", "ls")
    assert code == 0 and "mlp=0.42" not in table  # the narrow table keeps its columns
    code, out = run("devices", "describe", "dev-new")
    assert code == 0 and "mlp=0.42" in out

    # The next report replaces the score: the latest, not the worst ever.
    def lower() -> None:
        new.active["mlp"].drift_score = 0.05
        new.report()

    sim.loop.run_sync(lower)
    wait_for(lambda: cp.fleet.get("dev-new").models["mlp"].drift == pytest.approx(0.05), 10, what="new score")


def test_burst_cost_is_kept_with_the_serving_stats(cp: ControlPlane, sim: SimFleet) -> None:
    sim.add("dev-b")
    sim.connect()
    wait_for(lambda: cp.fleet.list_devices(), 10, what="device registered")
    state = mqtt_pb2.ReportedState(device_id="dev-b", observed_generation=0, health=1)
    state.stats.burst_cost, state.stats.burst_budget, state.stats.burst_held_back = 0.3, 0.3, 42
    device = sim.devices["dev-b"]
    sim.loop.run_sync(lambda: device._publish(device.topics.reported, state))
    wait_for(lambda: cp.fleet.get("dev-b").stats.get("burst_held_back") == 42, 10, what="burst stats")
    assert cp.fleet.get("dev-b").stats["burst_cost"] == pytest.approx(0.3)
