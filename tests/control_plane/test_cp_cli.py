"""The control-plane commands against a live control plane: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from edgectl.artifact import Artifact
from edgectl.cli import app as APP  # the real command tree, mounted as users get it
from edgectl.client import ControlPlaneClient, resolve_credentials, resolve_server
from edgectl.control_plane.server import ControlPlane
from edgectl.errors import EdgectlError, UsageError
from edgectl.ports import free_port
from edgectl.protos.v1 import fleet_pb2
from tests.control_plane.sim_device import SimFleet, wait_for


def run(*args: str) -> tuple[int, str]:
    """(exit code, output) with EdgectlError mapped the way `edgectl`'s main() maps it. With
    ``--json`` the output is stdout alone, as a pipe into jq sees it: the control plane serving
    in this process may log to stderr meanwhile."""
    result = CliRunner().invoke(APP, list(args))
    if isinstance(result.exception, EdgectlError):
        return result.exception.exit_code, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout if "--json" in args else result.output


def test_push_deploy_watch_and_inspect(
    cp: ControlPlane, sim: SimFleet, build: Callable[..., Artifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    art = build(version=1)
    code, out = run("artifact", "push", str(art.root), "--json")
    assert code == 0 and json.loads(out)["artifact"]["digest"] == art.digest
    code, out = run("artifact", "ls", "--json")
    assert code == 0 and [a["ref"]["version"] for a in json.loads(out)] == ["1"]
    for i in range(3):
        sim.add(f"dev-{i}", {"site": "lab"})
    sim.connect()
    wait_for(lambda: len(cp.fleet.list_devices()) == 3, 10, what="devices registered")
    code, out = run(
        "deploy",
        "digits:1",
        "--to",
        "site=lab",
        "--strategy",
        "1,100%",
        "--health-timeout",
        "5s",
        "--watch",
        "--json",
    )
    assert code == 0, out
    rollout = json.loads(out)
    assert rollout["state"] == "ROLLOUT_STATE_SUCCEEDED"
    code, out = run("rollout", "ls", "--json")
    assert code == 0 and json.loads(out)[0]["id"] == rollout["id"]
    code, out = run("rollout", "status", rollout["id"])
    assert code == 0 and rollout["id"] in out and "succeeded" in out
    code, out = run("devices", "ls", "-l", "site=lab", "--json")
    assert code == 0 and {d["active"]["digest"] for d in json.loads(out)} == {art.digest}
    code, out = run("devices", "label", "dev-0", "ring=canary")
    assert code == 0 and "ring=canary" in out
    code, out = run("devices", "enroll", "cam-9", "--labels", "site=lab", "--json")
    assert code == 0 and json.loads(out)["token"]
    code, out = run("audit", "ls", "--json")
    actions = {e["action"].rsplit("/", 1)[-1] for e in json.loads(out)}
    assert {"PlanUpload", "Upload", "Create", "LabelDevice", "CreateEnrollmentToken"} <= actions
    code, out = run("rollout", "pause", rollout["id"])
    assert code == 7 and out.startswith("failed precondition: rollout") and "\n" not in out


def test_failed_rollout_exits_non_zero(
    cp: ControlPlane, sim: SimFleet, build: Callable[..., Artifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    art = build(version=1)
    sim.add("dev-0", {"site": "lab"}, bad_digests={art.digest})
    sim.connect()
    wait_for(lambda: len(cp.fleet.list_devices()) == 1, 10, what="device registered")
    code, out = run("deploy", str(art.root), "--to", "id=dev-0", "--health-timeout", "5s", "--watch")
    assert code == 5 and "ended failed" in out and "dev-0: smoke test failed" in out


def test_errors_are_one_line_with_the_right_exit_code(
    cp: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    code, out = run("deploy", "nosuch", "--to", "site=lab")
    assert code == 6 and out.startswith("not found: artifact 'nosuch'")
    code, out = run("deploy", "nosuch", "--to", "site=lab", "--strategy", "1,half")
    assert code == 2 and "half" in out
    code, out = run("deploy", "nosuch", "--to", "site")
    assert code == 2 and "key=value" in out
    code, out = run("rollout", "status", "r-nope")
    assert code == 6 and "does not exist" in out
    code, out = run("devices", "ls", "--server", f"127.0.0.1:{free_port()}")
    assert code == 9 and "unreachable" in out


def test_site_lab_id_cam_9_is_refused_by_every_label_command_and_selects_by_id(
    cp: ControlPlane, sim: SimFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``id`` is the selector's device key, so a label ``id`` is refused where it is written (the
    CLI once dropped it silently); as a selector, ``site=lab,id=cam-9`` selects by label OR id."""
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    for device_id, site in (("dev-0", "lab"), ("cam-9", "dock"), ("dev-2", "dock")):
        sim.add(device_id, {"site": site})
    sim.connect()
    wait_for(lambda: len(cp.fleet.list_devices()) == 3, 10, what="devices registered")
    code, out = run("devices", "enroll", "cam-10", "--labels", "site=lab,id=cam-9")
    assert code == 2 and "'id' is reserved" in out
    code, out = run("devices", "enroll", "cam-10", "--ttl", "0")
    assert code == 2 and "at least 1s" in out  # not the hour a 0 on the wire stands for
    code, out = run("devices", "enroll", "cam-10", "--labels", "site=lab,camera=cam-9", "--json")
    assert code == 0 and json.loads(out)["token"]
    code, out = run("devices", "label", "dev-0", "site=lab,id=cam-9")
    assert code == 2 and "'id' is reserved" in out
    assert cp.fleet.get("dev-0").labels == {}
    code, out = run("devices", "label", "dev-0", "ring=canary,camera=cam-9")
    assert code == 0 and "camera=cam-9,ring=canary,site=lab" in out
    code, out = run("devices", "ls", "-l", "site=lab,id=cam-9", "--json")
    assert code == 0 and sorted(d["id"] for d in json.loads(out)) == ["cam-9", "dev-0"]


def test_rm_of_a_device_enrolled_but_never_joined_withdraws_its_enrollment(
    cp: ControlPlane, client: ControlPlaneClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`devices rm` of a device that has a token but never joined answered "not found" and left
    the token able to join; now the enrollment is withdrawn and the token refused."""
    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    code, out = run("devices", "enroll", "cam-11", "--labels", "site=lab", "--json")
    assert code == 0
    token = json.loads(out)["token"]
    code, out = run("devices", "rm", "cam-11")
    assert code == 0 and "cam-11 had not joined: its enrollment is withdrawn" in out, out
    with pytest.raises(grpc.RpcError) as refused:
        client.fleet.Enroll(fleet_pb2.EnrollRequest(device_id="cam-11", token=token))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not valid for device cam-11" in (refused.value.details() or "")
    code, out = run("devices", "ls", "--json")
    assert code == 0 and "cam-11" not in [d["id"] for d in json.loads(out)]
    code, out = run("devices", "rm", "cam-11")  # nothing left to remove
    assert code == 6 and "no pending enrollment" in out
    # A device that joined is still decommissioned as before.
    code, out = run("devices", "enroll", "cam-12", "--json")
    joined = client.fleet.Enroll(fleet_pb2.EnrollRequest(device_id="cam-12", token=json.loads(out)["token"]))
    assert joined.mqtt_username == "cam-12"
    code, out = run("devices", "rm", "cam-12")
    assert code == 0 and out.strip() == "cam-12 decommissioned"


def test_server_address_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="no control plane address"):
        resolve_server(None)
    data = tmp_path / "edgectl-data"
    data.mkdir()
    (data / "endpoints.json").write_text(json.dumps({"control_plane": "127.0.0.1:4000"}))
    assert resolve_server(None) == "127.0.0.1:4000"
    cfg = tmp_path / "edgectl-config"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.toml").write_text('server = "10.0.0.1:7443"\n')
    assert resolve_server(None) == "10.0.0.1:7443"
    monkeypatch.setenv("EDGECTL_SERVER", "10.0.0.2:7443")
    assert resolve_server(None) == "10.0.0.2:7443"
    assert resolve_server("10.0.0.3:7443") == "10.0.0.3:7443"


def test_credentials_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECTL_TOKEN", raising=False)
    monkeypatch.delenv("EDGECTL_CA", raising=False)
    none = resolve_credentials()
    assert none.token is None and none.ca_pem is None and not none.secure  # plaintext, dev mode
    data = tmp_path / "edgectl-data"
    data.mkdir()
    for name in ("up.crt", "cfg.crt", "env.crt", "flag.crt"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "up.token").write_text("from-up\n")
    up = {"grpc": "h:1", "ca": str(tmp_path / "up.crt"), "token_file": str(tmp_path / "up.token")}
    (data / "endpoints.json").write_text(json.dumps({"control_plane": up}))
    assert (resolve_credentials().token, resolve_credentials().ca_pem) == ("from-up", b"up.crt")
    cfg = tmp_path / "edgectl-config"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.toml").write_text(f'token = "from-config"\nca = "{tmp_path / "cfg.crt"}"\n')
    found = resolve_credentials()
    assert (found.token, found.ca_pem) == ("from-config", b"cfg.crt") and found.secure
    monkeypatch.setenv("EDGECTL_TOKEN", "from-env")
    monkeypatch.setenv("EDGECTL_CA", str(tmp_path / "env.crt"))
    assert (resolve_credentials().token, resolve_credentials().ca_pem) == ("from-env", b"env.crt")
    flagged = resolve_credentials("from-flag", tmp_path / "flag.crt")
    assert (flagged.token, flagged.ca_pem) == ("from-flag", b"flag.crt")
    assert "from-flag" not in repr(flagged)  # a token never reaches a log line through repr
    with pytest.raises(UsageError, match="cannot read the CA"):
        resolve_credentials(ca=tmp_path / "missing.crt")


def test_every_command_has_help_with_an_example() -> None:
    for args in (["deploy"], ["rollout", "ls"], ["rollout", "status"], ["rollout", "rollback"], ["devices", "ls"],
                 ["devices", "enroll"], ["devices", "label"], ["devices", "rm"], ["audit", "ls"],
                 ["artifact", "push"], ["artifact", "ls"], ["artifact", "rm"], ["control-plane", "serve"],
                 ["control-plane", "token"]):  # fmt: skip
        code, out = run(*args, "--help")
        assert code == 0 and "Example" in out, args
