"""`edgectl demo`: the main job end to end on a local fleet."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from edgectl.cli.output import console, err_console, print_json


def demo(
    data_dir: Path = typer.Option(
        None, help="where the demo's fleet and artifacts live (default: a new temporary directory)"
    ),
    agents: int = typer.Option(2, min=1, help="number of local edge agents"),
    json_out: bool = typer.Option(False, "--json", help="print what each step measured as JSON at the end"),
) -> None:
    """Train, compress, deploy in waves, infer, and roll back a bad version, all locally.

    Starts its own broker, control plane and agents on free ports (nothing else needs to run),
    checks every step and exits non-zero if one does not hold. About a minute on two cores.

    Example: edgectl demo
    """
    from edgectl.demo import Demo

    screen = err_console if json_out else console  # --json keeps stdout for the one JSON document
    if data_dir is None:
        with tempfile.TemporaryDirectory(prefix="edgectl-demo-") as tmp:
            report = Demo(Path(tmp), screen, agents=agents).run()
    else:
        report = Demo(data_dir.resolve(), screen, agents=agents).run()
    if json_out:
        print_json({"seconds": round(report.seconds, 1), "steps": report.steps})
