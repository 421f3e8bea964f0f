"""endpoints.json: the one reader/writer of `edgectl up`'s record, and the data-dir variables that
no longer overlap (the local fleet's EDGECTL_DATA_DIR, the agent's EDGECTL_AGENT_DATA_DIR)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer

from edgectl.cli import app as APP
from edgectl.client import resolve_credentials, resolve_server
from edgectl.endpoints import (
    DATA_DIR_ENV,
    AgentEndpoint,
    Endpoints,
    EndpointsFileError,
    LocalFleetError,
    default_data_dir,
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("EDGECTL_SERVER", "EDGECTL_TOKEN", "EDGECTL_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "fleet"))
    (tmp_path / "fleet").mkdir()
    return tmp_path / "fleet"


def test_written_endpoints_read_back_and_feed_the_client(_isolated: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA PEM")
    (tmp_path / "admin.token").write_text("tok\n")
    written = Endpoints(
        "mqtts://127.0.0.1:8883", "127.0.0.1:7443",
        agents=[AgentEndpoint("edge-0", "127.0.0.1:8001", {"tier": "edge"}, 42)],
        device_grpc="127.0.0.1:7444", ca=str(tmp_path / "ca.crt"), token_file=str(tmp_path / "admin.token"),
    )  # fmt: skip
    written.write(_isolated)
    assert default_data_dir() == _isolated
    assert Endpoints.find() == written == Endpoints.read(_isolated)
    assert resolve_server(None) == "127.0.0.1:7443"
    creds = resolve_credentials()
    assert creds.token == "tok" and creds.ca_pem == b"CA PEM"
    Endpoints.remove(_isolated)
    assert Endpoints.find() is None
    with pytest.raises(LocalFleetError, match="no local fleet"):
        Endpoints.read(_isolated)


def test_an_older_file_with_a_plain_address_still_reads(_isolated: Path) -> None:
    (_isolated / "endpoints.json").write_text(json.dumps({"control_plane": "127.0.0.1:4000"}))
    found = Endpoints.find()
    assert found is not None and found.control_plane == "127.0.0.1:4000" and not found.secure
    (_isolated / "endpoints.json").write_text(json.dumps({"control_plane": {"address": "127.0.0.1:4001"}}))
    assert resolve_server(None) == "127.0.0.1:4001"


@pytest.mark.parametrize("content", ["{not json", "[]", '{"control_plane": {"ca": "x"}}'])
def test_a_damaged_file_is_a_clear_error_but_never_blocks_an_explicit_server(
    _isolated: Path, content: str
) -> None:
    (_isolated / "endpoints.json").write_text(content)
    with pytest.raises(EndpointsFileError) as err:
        resolve_server(None)
    assert err.value.exit_code == 2 and "endpoints.json" in str(err.value)
    assert resolve_server("10.0.0.3:7443") == "10.0.0.3:7443"  # the flag wins without reading the file


def test_the_agent_data_dir_has_its_own_variable() -> None:
    """EDGECTL_DATA_DIR is the local fleet's folder; the agent's --data-dir must not pick it up."""
    root: Any = typer.main.get_command(APP)  # typer's own click: groups have .commands, commands .params
    params = {p.name: p for p in root.commands["agent"].commands["run"].params}
    assert params["data_dir"].envvar == "EDGECTL_AGENT_DATA_DIR"
    assert all(getattr(p, "envvar", None) != DATA_DIR_ENV for p in params.values())
