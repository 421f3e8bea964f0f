"""What every command that calls the control plane shares: its options, the client, formatting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message

from edgectl.client import ControlPlaneClient, resolve_credentials, resolve_server

SERVER_HELP = "control plane HOST:PORT (else EDGECTL_SERVER, config.toml, or `edgectl up`'s endpoints.json)"
ServerOpt = typer.Option(None, "--server", "-s", help=SERVER_HELP)
TokenOpt = typer.Option(
    None, "--token", help="bearer token (else EDGECTL_TOKEN or token in config.toml); never printed"
)
CaOpt = typer.Option(
    None, "--ca", help="fleet CA certificate to trust (else EDGECTL_CA or ca in config.toml)"
)
JsonOpt = typer.Option(False, "--json", help="print JSON instead of a table")


def connect(server: str | None, token: str | None = None, ca: Path | None = None) -> ControlPlaneClient:
    """A client for the control plane the flags, env, config file or `edgectl up` name."""
    return ControlPlaneClient(resolve_server(server), credentials=resolve_credentials(token, ca))


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data, with the .proto field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def enum_name(value: int, enum: Any, prefix: str) -> str:
    """``ROLLOUT_STATE_RUNNING`` -> ``running``."""
    return str(enum.Name(value)).removeprefix(prefix).lower()


def short_digest(digest: str) -> str:
    """``sha256:`` and the first twelve hex digits, enough to tell artifacts apart in a table."""
    return digest[:19] if digest else "-"


def ago(ts: Any) -> str:
    """A protobuf Timestamp as ``42s ago``, ``5m ago`` or ``3h ago``."""
    if not ts.seconds:
        return "-"
    delta = max(0, int(time.time() - ts.seconds))
    return (
        f"{delta}s ago" if delta < 120 else f"{delta // 60}m ago" if delta < 7200 else f"{delta // 3600}h ago"
    )
