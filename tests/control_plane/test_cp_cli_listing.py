"""The CLI at fleet size, against a live control plane: every ls follows pages, one -o for every
format, get/describe, and named contexts that pick the control plane."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgectl.cli import app as APP
from edgectl.contexts import CliConfig
from edgectl.control_plane.device_state import Status
from edgectl.control_plane.server import ControlPlane
from edgectl.errors import EdgectlError
from tests.control_plane.conftest import BuildFn

FLEET = 2500  # past two full pages of the server's 1,000-item maximum


def run(*args: str) -> tuple[int, str]:
    """(exit code, stdout) with EdgectlError mapped as `edgectl`'s main() maps it."""
    result = CliRunner().invoke(APP, list(args))
    if isinstance(result.exception, EdgectlError):
        return result.exception.exit_code, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


@pytest.fixture
def fleet_cp(cp: ControlPlane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ControlPlane:
    """The control plane with 2,500 devices, registered the way MQTT ingest registers them."""
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "300")  # tables at full width, as on a wide terminal
    now = time.time()
    cp.fleet.apply([Status(f"dev-{i:04d}", i % 3 != 0, now) for i in range(FLEET)])
    assert len(cp.fleet.list_devices()) == FLEET
    return cp


def test_devices_ls_lists_the_whole_fleet_across_pages(fleet_cp: ControlPlane) -> None:
    code, out = run("devices", "ls", "-o", "json")
    assert code == 0, out
    ids = [d["id"] for d in json.loads(out)]
    assert len(ids) == FLEET and len(set(ids)) == FLEET  # no page lost, none twice
    assert ids == sorted(ids)
    code, out = run("devices", "ls", "--json")  # the short form says the same
    assert code == 0 and len(json.loads(out)) == FLEET


def test_every_format_of_ls_and_get(fleet_cp: ControlPlane) -> None:
    code, out = run("devices", "ls", "-l", "id=dev-0001,id=dev-0003", "-o", "yaml")
    assert code == 0, out
    assert [d["id"] for d in yaml.safe_load(out)] == ["dev-0001", "dev-0003"]
    code, table = run("devices", "ls", "-l", "id=dev-0001")
    code_wide, wide = run("devices", "ls", "-l", "id=dev-0001", "-o", "wide")
    assert code == code_wide == 0 and "dev-0001" in table and "dev-0001" in wide
    assert "profile" in wide and "profile" not in table  # wide has more columns
    code, out = run("devices", "get", "dev-0002", "-o", "json")
    assert code == 0 and json.loads(out)["id"] == "dev-0002" and json.loads(out)["online"] is True
    code, out = run("devices", "get", "nope")
    assert code == 6 and "not found" in out
    code, out = run("devices", "ls", "-o", "xml")
    assert code == 2  # typer refuses a format it does not know


def test_describe_shows_the_device_its_rollouts_and_its_audit_trail(
    fleet_cp: ControlPlane, build: BuildFn
) -> None:
    assert run("devices", "label", "dev-0005", "ring=canary")[0] == 0
    bundle = build(version=1)
    code, out = run("deploy", str(bundle.root), "--to", "id=dev-0005,id=dev-0007", "--strategy", "100%")
    assert code == 0, out
    code, out = run("devices", "describe", "dev-0005", "-o", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["device"]["labels"] == {"ring": "canary"}
    assert [r["artifact"] for r in doc["rollouts"]] == ["digits:1"]  # the rollout it is in
    assert [e["action"].rsplit("/", 1)[-1] for e in doc["audit"]] == ["LabelDevice"]
    code, out = run("devices", "describe", "dev-0005")
    assert code == 0 and "audit trail" in out and "LabelDevice" in out and "digits:1" in out
    code, out = run("devices", "describe", "dev-0004", "-o", "json")
    assert code == 0 and json.loads(out)["rollouts"] == []  # not a target


def test_contexts_pick_the_control_plane(fleet_cp: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECTL_SERVER")
    assert run("config", "set-context", "here", "--server", fleet_cp.address)[0] == 0
    assert run("config", "set-context", "nowhere", "--server", "127.0.0.1:1")[0] == 0
    assert run("config", "use-context", "here")[0] == 0
    code, out = run("devices", "get", "dev-0001", "-o", "json")
    assert code == 0 and json.loads(out)["id"] == "dev-0001"
    code, out = run("--context", "nowhere", "devices", "get", "dev-0001")
    assert code == 9 and "unreachable" in out  # one command elsewhere: the flag wins over the file
    code, out = run("config", "get-contexts", "-o", "json")
    assert code == 0 and [(c["name"], c["current"]) for c in json.loads(out)] == [
        ("here", True),
        ("nowhere", False),
    ]
    code, out = run("config", "use-context", "missing")
    assert code == 2 and "no context 'missing'" in out
    config_file = CliConfig.path()
    assert config_file.stat().st_mode & 0o777 == 0o600  # it may hold a token
    assert 'current_context = "here"' in config_file.read_text()


def test_audit_ls_follows_pages_up_to_its_limit(fleet_cp: ControlPlane) -> None:
    for i in range(5):
        assert run("devices", "label", f"dev-{i:04d}", f"n={i}")[0] == 0
    code, out = run("audit", "ls", "--limit", "3", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 3
    code, out = run("audit", "ls", "--limit", "0", "-o", "json")
    assert code == 0 and len(json.loads(out)) >= 5


def test_a_device_that_does_not_answer_is_not_called_an_unreachable_control_plane(
    fleet_cp: ControlPlane,
) -> None:
    # dev-0001 is in the inventory and online, but no agent answers its logs request.
    code, out = run("devices", "logs", "dev-0001", "-n", "5")
    assert code == 9 and "dev-0001" in out, out  # UNAVAILABLE: try again later ...
    assert "unreachable" not in out, out  # ... but the control plane answered: no "check --server" hint
