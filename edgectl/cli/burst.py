"""`edgectl burst`: the fleet's burst spending this period, against its budget, and each device's share."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from rich.table import Table

from edgectl.cli.output import Output, OutputOpt, console, output_format, show
from edgectl.cli.remote import CaOpt, JsonOpt, ServerOpt, TokenOpt, connect, message_to_dict
from edgectl.protos.v1 import fleet_pb2


def _table(status: fleet_pb2.BurstBudgetStatus, wide: bool) -> Table:
    table = Table("device", "online", "cost", "share", "granted", "grants", title=_title(status))
    for d in status.devices:
        online = "yes" if d.online else "[red]no[/]"
        granted = f"{d.granted:g}" if d.follows_grants else "-"
        grants = "yes" if d.follows_grants else "[yellow]no[/] (older agent: its own budget only)"
        table.add_row(d.device_id, online, f"{d.cost:g}", f"{100 * d.share:.1f}%", granted, grants)
    return table


def _title(status: fleet_pb2.BurstBudgetStatus) -> str:
    start = dt.datetime.fromtimestamp(status.period_start.seconds, dt.timezone.utc)
    period = f"period from {start:%Y-%m-%d %H:%M} UTC ({status.period_seconds} s)"
    if not status.budget:
        return f"burst cost {status.spent:g}, no fleet budget; {period}"
    used = 100 * status.spent / status.budget
    return f"burst cost {status.spent:g} of the fleet budget {status.budget:g} ({used:.1f}% used, {status.granted:g} granted); {period}"


def burst(
    output: Output | None = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """The fleet's burst cost this period against its budget, and each device's cost and share.

    The fleet budget is the control plane's --fleet-burst-budget per --fleet-burst-period.

    Example: edgectl burst -o json
    """
    fmt = output_format(output, json_out)
    with connect(server, token, ca) as client:
        status = client.call(client.fleet.GetBurstBudget, fleet_pb2.GetBurstBudgetRequest())
    if fmt in (Output.TABLE, Output.WIDE) and not status.devices:
        console.print(_title(status))
        return
    show(fmt, message_to_dict(status), lambda wide: _table(status, wide))
