"""Commands of the documented tree whose implementation lands with later issues.

Each has its real options and help, and exits non-zero with "not implemented yet":
never a pretended success. Moving one out of here is how an issue lands its command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgectl.cli.output import not_implemented

SERVER_HELP = "control plane address HOST:PORT (env EDGECTL_SERVER, else endpoints.json of `edgectl up`)"

deploy_help = """Roll an artifact out to the devices a selector picks, in gated waves.

Example: edgectl deploy digits:3 --to site=lab --strategy 1,10%,50%,100% --max-failures 1 --watch
"""


def deploy(
    artifact: str = typer.Argument(..., help="artifact digest, NAME:VERSION, NAME (newest) or a bundle path"),
    to: str = typer.Option(..., "--to", help="device selector: k=v[,k=v] labels, or id=DEVICE[,id=...]"),
    strategy: str = typer.Option("1,10%,50%,100%", help="cumulative wave sizes, counts or percentages"),
    max_failures: str = typer.Option("0", help="failure budget: N devices or N%% of the targets"),
    health_timeout: str = typer.Option("2m", help="time a device has to report the new model healthy"),
    watch: bool = typer.Option(False, "--watch", help="follow the rollout live; exit 0 only on success"),
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the created rollout as JSON"),
) -> None:
    not_implemented("deploy", "control_plane")


rollout_app = typer.Typer(help="Inspect and steer rollouts: ls, status, pause, resume, abort, rollback.")


def _rollout_command(action: str, summary: str) -> None:
    def command(
        rollout_id: str = typer.Argument(..., metavar="ID", help="rollout id"),
        server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
        json_out: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        not_implemented(f"rollout {action}", "control_plane")

    command.__doc__ = f"{summary}\n\nExample: edgectl rollout {action} r-1a2b3c"
    rollout_app.command(action)(command)


@rollout_app.command("ls")
def rollout_ls(
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List rollouts, newest first.

    Example: edgectl rollout ls --json
    """
    not_implemented("rollout ls", "control_plane")


for _action, _summary in [
    ("status", "Show a rollout's waves and devices."),
    ("pause", "Pause a running rollout after its current step."),
    ("resume", "Resume a paused rollout."),
    ("abort", "Stop a rollout; moved devices keep the new artifact."),
    ("rollback", "Stop a rollout and move every moved device back to its previous artifact."),
]:
    _rollout_command(_action, _summary)

devices_app = typer.Typer(help="The fleet's devices: ls, enroll, label, rm.")


@devices_app.command("ls")
def devices_ls(
    selector: str | None = typer.Option(None, "--selector", "-l", help="k=v[,k=v] label selector"),
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List devices with their live state (online, active artifact, health, last seen).

    Example: edgectl devices ls -l site=lab
    """
    not_implemented("devices ls", "control_plane")


@devices_app.command("enroll")
def devices_enroll(
    device_id: str = typer.Argument(..., metavar="ID"),
    labels: str | None = typer.Option(None, help="k=v[,k=v] labels to give the device"),
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Make a one-time enrollment token that an agent exchanges for its credentials.

    Example: edgectl devices enroll cam-07 --labels site=lab,gpu=orin
    """
    not_implemented("devices enroll", "control_plane")


@devices_app.command("label")
def devices_label(
    device_id: str = typer.Argument(..., metavar="ID"),
    labels: list[str] = typer.Argument(..., help="k=v to set, k- to remove"),
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
) -> None:
    """Set or remove a device's labels.

    Example: edgectl devices label cam-07 ring=canary old-
    """
    not_implemented("devices label", "control_plane")


@devices_app.command("rm")
def devices_rm(
    device_id: str = typer.Argument(..., metavar="ID"),
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
) -> None:
    """Decommission a device: revoke its credentials and forget it.

    Example: edgectl devices rm cam-07
    """
    not_implemented("devices rm", "control_plane")


audit_app = typer.Typer(help="The audit log of every mutating call.")


@audit_app.command("ls")
def audit_ls(
    since: str | None = typer.Option(None, help="only entries newer than this, e.g. 1h or 2026-11-01"),
    server: str | None = typer.Option(None, envvar="EDGECTL_SERVER", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List who did what, when and from where.

    Example: edgectl audit ls --since 24h
    """
    not_implemented("audit ls", "control_plane")


control_plane_app = typer.Typer(help="Run the control plane (gRPC API, state, rollout controller).")


@control_plane_app.command("serve")
def control_plane_serve(
    listen: str = typer.Option("127.0.0.1:7443", help="gRPC listen address HOST:PORT"),
    mqtt: str = typer.Option("mqtt://127.0.0.1:1883", envvar="EDGECTL_MQTT", help="broker URL"),
    state: str = typer.Option("sqlite:///edgectl.db", help="sqlite:///FILE or postgresql://..."),
    blobs: str = typer.Option("./blobs", help="blob store: a directory or s3://bucket/prefix"),
) -> None:
    """Serve the gRPC API and drive rollouts over MQTT.

    Example: edgectl control-plane serve --listen 0.0.0.0:7443 --state postgresql://cp@db/edgectl
    """
    not_implemented("control-plane serve", "control_plane")


def up(
    agents: int = typer.Option(2, help="number of local agents"),
    data_dir: Path | None = typer.Option(None, help="where state lives (default ~/.edgectl)"),
    detach: bool = typer.Option(False, "--detach", help="return once everything listens"),
) -> None:
    """Start a single-box fleet: broker, control plane, agents and a burst endpoint.

    Example: edgectl up --agents 3
    """
    not_implemented("up", "end-to-end")


def down(data_dir: Path | None = typer.Option(None, help="the data dir `edgectl up` used")) -> None:
    """Stop a fleet started with `edgectl up --detach`.

    Example: edgectl down
    """
    not_implemented("down", "end-to-end")


def demo() -> None:
    """Train, compress, deploy in waves, infer, and roll back a bad version, all locally.

    Example: edgectl demo
    """
    not_implemented("demo", "end-to-end")


deploy.__doc__ = deploy_help


def compress(
    model: str = typer.Argument(..., help="model.onnx, model.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "-o", "--out", help="output artifact directory"),
    profile: str = typer.Option("x86-cpu-avx2", help="target device profile"),
) -> None:
    """Compress a model into a signed artifact for a device profile.

    Example: edgectl compress model.onnx --profile x86-cpu-vnni --eval eval.npz -o out/
    """
    not_implemented("compress", "compress")
