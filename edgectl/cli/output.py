"""What every command shares: the consoles and machine output (``-o table|wide|json|yaml``)."""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class Output(str, enum.Enum):
    """How a command that prints data prints it."""

    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"


OutputOpt = typer.Option(
    None, "--output", "-o", help="table (default), wide (more columns), json or yaml", case_sensitive=False
)
WatchOpt = typer.Option(False, "--watch", "-w", help="redraw every --interval seconds until Ctrl-C")
IntervalOpt = typer.Option(2.0, "--interval", min=0.2, help="seconds between redraws with --watch")


def output_format(output: Output | None, json_out: bool) -> Output:
    """The format asked for: ``-o``, else ``--json`` (kept as the short form of ``-o json``), else table."""
    if output is not None:
        return output
    return Output.JSON if json_out else Output.TABLE


def print_json(data: Any) -> None:
    """Machine output: one JSON document on stdout, nothing else."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_yaml(data: Any) -> None:
    """Machine output: one YAML document on stdout."""
    print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=True).rstrip())


@contextlib.contextmanager
def byte_progress(what: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for work measured in bytes; yields ``update(done, total)``. Drawn
    only on a terminal, so pipes and ``-o json`` see nothing of it."""
    bar = Progress(
        TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, disable=not (enabled and err_console.is_terminal),
    )  # fmt: skip
    task = bar.add_task(what, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def show(fmt: Output, data: Any, table: Callable[[bool], Table]) -> None:
    """Print ``data`` as JSON or YAML, or ``table(wide)`` for the human formats."""
    if fmt is Output.JSON:
        print_json(data)
    elif fmt is Output.YAML:
        print_yaml(data)
    else:
        console.print(table(fmt is Output.WIDE))


def watch(fmt: Output, fetch: Callable[[], tuple[Any, Callable[[bool], Table]]], interval: float) -> None:
    """Fetch and print again every ``interval`` s until Ctrl-C: a live table, or one JSON/YAML
    document per refresh (JSON one per line, YAML separated by ``---``) for a pipe to follow."""
    try:
        if fmt in (Output.JSON, Output.YAML):
            while True:
                data, _ = fetch()
                if fmt is Output.JSON:
                    print(json.dumps(data, sort_keys=True, default=str), flush=True)
                else:
                    print("---", flush=True)
                    print_yaml(data)
                time.sleep(interval)
        data, table = fetch()
        with Live(table(fmt is Output.WIDE), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                data, table = fetch()
                live.update(table(fmt is Output.WIDE), refresh=True)
    except KeyboardInterrupt:
        return
