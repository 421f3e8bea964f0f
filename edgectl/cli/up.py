"""`edgectl up` and `edgectl down`: a single-box fleet for trying edgectl and for tests."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from edgectl.cli.output import console, print_json
from edgectl.endpoints import Endpoints, default_data_dir
from edgectl.localfleet import LocalFleet, stop_detached
from edgectl.security.files import private_umask


def _show(endpoints: Endpoints, data_dir: Path, json_out: bool) -> None:
    if json_out:
        print_json({"data_dir": str(data_dir), **asdict(endpoints)})
        return
    table = Table(title=f"local fleet in {data_dir}")
    table.add_column("part")
    table.add_column("listens on")
    table.add_row(
        "mqtt broker" + (" (TLS, per-device identities)" if endpoints.secure else ""), endpoints.mqtt
    )
    table.add_row(
        "control plane (gRPC" + (", TLS + token)" if endpoints.secure else ")"), endpoints.control_plane
    )
    if endpoints.device_grpc:
        table.add_row("control plane for agents (gRPC, mTLS)", endpoints.device_grpc)
    if endpoints.console:
        table.add_row(
            "web console" + (" (HTTPS, log in with a token)" if endpoints.secure else ""), endpoints.console
        )
    for part, where in endpoints.metrics.items():
        table.add_row(f"metrics of {part} (Prometheus)", f"http://{where}/metrics")
    if endpoints.cloud:
        table.add_row("cloud burst endpoint (KServe V2)", endpoints.cloud.v2)
    for agent in endpoints.agents:
        table.add_row(f"agent {agent.device_id} (KServe V2)", agent.v2)
    console.print(table)
    console.print(f"endpoints: {data_dir / 'endpoints.json'}")
    if endpoints.secure:
        console.print(
            f"fleet CA: {endpoints.ca}; admin token (0600): {endpoints.token_file}; edgectl commands use both"
        )
    else:
        console.print("[yellow]insecure: plaintext MQTT and gRPC, anyone on this machine can deploy[/]")


def up(
    agents: int = typer.Option(2, help="number of local edge agents"),
    data_dir: Path = typer.Option(None, help="where state lives (default $EDGECTL_DATA_DIR or ~/.edgectl)"),
    detach: bool = typer.Option(
        False, "--detach", help="return once everything listens; stop with `edgectl down`"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the endpoints as JSON"),
    insecure: bool = typer.Option(
        False, "--insecure", help="plaintext MQTT and gRPC, no identities: for debugging only"
    ),
    trust: list[Path] = typer.Option(
        None, help="public key (.pub.pem) the fleet trusts; repeatable (default: your default signing key)"
    ),
) -> None:
    """Start a single-box fleet: broker, control plane, agents and a burst endpoint.

    Everything runs as real processes on free ports; Ctrl-C stops all of it cleanly.

    Example: edgectl up --agents 3
    """
    with private_umask():  # every part's state, keys and logs (the children inherit it): this user's only
        _up(agents, data_dir, detach, json_out, insecure, trust)


def _up(
    agents: int, data_dir: Path | None, detach: bool, json_out: bool, insecure: bool, trust: list[Path]
) -> None:
    directory = (data_dir or default_data_dir()).resolve()
    fleet = LocalFleet(directory, agents=agents, trust=trust or None, secure=not insecure)
    endpoints = fleet.start()  # stops what it started when it fails or is interrupted
    if detach:
        _show(endpoints, directory, json_out)
        return
    try:  # from here a Ctrl-C at any point stops the fleet: no process outlives the command
        _show(endpoints, directory, json_out)
        console.print("[dim]Ctrl-C stops the fleet[/]")
        fleet.wait()
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        fleet.stop()


def down(
    data_dir: Path = typer.Option(
        None, help="the data dir `edgectl up` used (default $EDGECTL_DATA_DIR or ~/.edgectl)"
    ),
) -> None:
    """Stop a fleet started with `edgectl up --detach`.

    Example: edgectl down
    """
    directory = (data_dir or default_data_dir()).resolve()
    stopped = stop_detached(directory)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
