"""The `edgectl` command line: thin commands over the packages, one error line per failure.

Commands import their heavy dependencies (torch, onnxruntime, grpc servers) inside the
command body, so `edgectl --help` stays instant and the agent's install needs no torch.
"""

from __future__ import annotations

import sys
import traceback

import typer
from rich.text import Text

from edgectl import __version__
from edgectl.cli import (
    agent,
    artifact,
    audit,
    broker,
    burst,
    compress,
    config,
    control_plane,
    demo,
    devices,
    doctor,
    infer,
    keys,
    rollout,
    sim,
    up,
)
from edgectl.cli.output import err_console
from edgectl.contexts import CONTEXT_ENV, use_for_this_command
from edgectl.errors import EdgectlError

app = typer.Typer(
    name="edgectl",
    help="Compress models for edge devices and roll them out to a fleet in gated waves.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        print(f"edgectl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show tracebacks on errors"),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version"
    ),
    context: str | None = typer.Option(
        None, "--context", help=f"use this context of config.toml for this command (else ${CONTEXT_ENV})"
    ),
) -> None:
    _state["verbose"] = verbose
    use_for_this_command(context)


app.command("compress")(compress.compress)
app.add_typer(artifact.app, name="artifact", help="Inspect, push, list and remove artifacts.")
app.add_typer(keys.app, name="keys", help="Manage Ed25519 signing keys.")
app.command("deploy")(rollout.deploy)
app.add_typer(rollout.app, name="rollout")
app.add_typer(devices.app, name="devices")
app.add_typer(audit.app, name="audit")
app.add_typer(control_plane.app, name="control-plane")
app.add_typer(agent.app, name="agent")
app.add_typer(broker.app, name="broker")
app.add_typer(sim.app, name="sim")
app.add_typer(config.app, name="config")
app.command("up")(up.up)
app.command("down")(up.down)
app.command("demo")(demo.demo)
app.command("infer")(infer.infer)
app.command("doctor")(doctor.doctor)
app.command("burst")(burst.burst)


def main() -> None:
    """Console-script entry point: run the app, map EdgectlError to one line and its exit code."""
    try:
        app()
    except EdgectlError as exc:
        if _state["verbose"]:
            traceback.print_exc()
        # soft_wrap: a long path in the message stays one piece to copy, the terminal wraps it
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
