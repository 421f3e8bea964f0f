"""`edgectl audit ls`: who did what, when and from where."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from edgectl.cli.output import console, print_json
from edgectl.cli.remote import (
    CaOpt,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    connect,
    message_to_dict,
)
from edgectl.control_plane.strategy import parse_duration
from edgectl.protos.v1 import common_pb2, rollouts_pb2

# -- audit ---------------------------------------------------------------------------------------

app = typer.Typer(help="The audit log of every mutating call.")


@app.command("ls")
def audit_ls(
    since: str | None = typer.Option(None, help="only entries newer than this, e.g. 1h or 30m"),
    action: str = typer.Option("", help="only this method, e.g. /edgectl.v1.RolloutService/Create"),
    limit: int = typer.Option(100, help="at most this many entries"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List who did what, when and from where.

    Example: edgectl audit ls --since 24h
    """
    request = rollouts_pb2.ListAuditRequest(page=common_pb2.Page(page_size=limit), action=action)
    if since:
        request.range.since.FromSeconds(int(time.time() - parse_duration(since)))
    with connect(server, token, ca) as client:
        entries = client.call(client.audit.List, request).entries
    if json_out:
        print_json([message_to_dict(e) for e in entries])
        return
    table = Table("when", "who", "from", "action", "target", "outcome")
    for e in entries:
        table.add_row(
            e.at.ToJsonString(),
            e.actor.identity,
            e.actor.peer,
            e.action.rsplit(".", 1)[-1],
            e.target,
            e.outcome,
        )
    console.print(table)
