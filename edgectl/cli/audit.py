"""`edgectl audit ls`: who did what, when and from where."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from edgectl.cli.output import Output, OutputOpt, output_format, show
from edgectl.cli.remote import (
    CaOpt,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    connect,
    message_to_dict,
)
from edgectl.control_plane.strategy import parse_duration
from edgectl.errors import UsageError
from edgectl.protos.v1 import rollouts_pb2

# -- audit ---------------------------------------------------------------------------------------

app = typer.Typer(help="The audit log of every mutating call.")


@app.command("ls")
def audit_ls(
    since: str | None = typer.Option(None, help="only entries newer than this, e.g. 1h or 30m"),
    action: str = typer.Option("", help="only this method, e.g. /edgectl.v1.RolloutService/Create"),
    limit: int = typer.Option(100, help="at most this many entries, newest first (0: all, every page)"),
    output: Output | None = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List who did what, when and from where.

    Example: edgectl audit ls --since 24h --limit 0 -o json
    """
    if limit < 0:
        raise UsageError(f"--limit {limit} must not be negative", hint="0 lists every entry")
    request = rollouts_pb2.ListAuditRequest(action=action)
    if since:
        request.range.since.FromSeconds(int(time.time() - parse_duration(since)))
    with connect(server, token, ca) as client:
        entries = client.list_all(client.audit.List, request, "entries", limit=limit)

    def table(wide: bool) -> Table:
        out = Table("when", "who", "from", "action", "target", "outcome", *(("details",) if wide else ()))
        for e in entries:
            row = [
                e.at.ToJsonString(),
                e.actor.identity,
                e.actor.peer,
                e.action.rsplit(".", 1)[-1],
                e.target,
                e.outcome,
            ]
            out.add_row(*row, *((e.details,) if wide else ()))
        return out

    show(output_format(output, json_out), [message_to_dict(e) for e in entries], table)
