"""`edgectl deploy` and `edgectl rollout ls|status|pause|resume|abort|rollback`: live views of a rollout."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgectl.cli.output import (
    IntervalOpt,
    Output,
    OutputOpt,
    WatchOpt,
    byte_progress,
    console,
    output_format,
    print_json,
    show,
    watch,
)
from edgectl.cli.remote import (
    CaOpt,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    connect,
    enum_name,
    message_to_dict,
    short_digest,
)
from edgectl.cli.rollout_view import rollout_table, rollouts_table, watch_rollout
from edgectl.client import push_artifact
from edgectl.control_plane.strategy import parse_duration, parse_start_at, parse_window
from edgectl.errors import EdgectlError, UsageError
from edgectl.labels import parse_selector
from edgectl.protos.v1 import common_pb2, rollouts_pb2

# -- deploy and rollouts -------------------------------------------------------------------------


def deploy(
    artifact: str = typer.Argument(
        ..., help="artifact digest, NAME:VERSION, NAME (newest) or a bundle path to push"
    ),
    to: str = typer.Option(..., "--to", help="device selector: k=v[,k=v] labels, or id=DEVICE[,id=...]"),
    strategy: str = typer.Option("1,10%,50%,100%", help="cumulative wave sizes: counts or percentages"),
    max_failures: str = typer.Option("0", help="failure budget: N devices or N% of the targets"),
    health_timeout: str = typer.Option("2m", help="time a device has to report the new model healthy"),
    soak: str = typer.Option("0", help="soak window after a device is healthy, e.g. 5m (0: none)"),
    max_error_rate: float = typer.Option(
        0.0, help="fail a device whose error rate exceeds this during the soak"
    ),
    max_p99_ms: float = typer.Option(
        0.0, help="fail a device whose p99 latency (ms) exceeds this during the soak"
    ),
    offline: str = typer.Option("fail", help="a device offline past the timeout: fail or skip"),
    continuous: bool = typer.Option(
        False,
        "--continuous",
        help="after the waves, keep following the selector: devices that match later get the model, "
        "devices that stop matching go back to what they ran before",
    ),
    start_at: str = typer.Option(
        "", "--start-at", help="start later: +2h, +30m or ISO 8601 (2026-12-01T02:00+01:00)"
    ),
    window: str = typer.Option(
        "",
        "--window",
        help='devices swap only inside this window, e.g. "Mon-Fri 01:00-04:00 Europe/Berlin" '
        "(they download at once)",
    ),
    pause_after_wave: list[int] = typer.Option(
        [],
        "--pause-after-wave",
        help="pause after wave N (1-based) until `edgectl rollout resume`; repeatable",
    ),
    canary_traffic: str = typer.Option(
        "",
        "--canary-traffic",
        help="run the artifact beside the current version on each device, answering P%",
        show_default=False,
    ),
    shadow: bool = typer.Option(
        False, "--shadow", help="run every request also on the artifact, the current version answering"
    ),
    min_agreement: float = typer.Option(
        0.0, help="canary/shadow: fail a device whose candidate agrees less (top-1 or cosine, 0..1)"
    ),
    max_p99_ratio: float = typer.Option(
        0.0,
        help="canary/shadow: fail a device whose candidate p99 exceeds this x the current p99 "
        "(judged once each version served 100 requests)",
    ),
    watch: bool = typer.Option(
        False,
        "--watch",
        "-w",
        help="follow the rollout live; exit 0 only on success (with --continuous: once it follows)",
    ),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Roll an artifact out to the devices a selector picks, in gated waves.

    Example: edgectl deploy digits:3 --to site=lab --strategy 1,10%,50%,100% --max-failures 1 --watch
    Example: edgectl deploy digits:3 --to site=lab --continuous --window "Mon-Fri 01:00-04:00 Europe/Berlin"
    """
    if offline not in ("fail", "skip"):
        raise UsageError(f"--offline {offline!r} must be fail or skip")
    parse_window(window)  # a typo fails here, before anything is pushed
    spec = rollouts_pb2.Strategy(
        waves=[w.strip() for w in strategy.split(",") if w.strip()],
        max_failures=max_failures,
        health_timeout_seconds=max(1, round(parse_duration(health_timeout))),
        soak_seconds=round(parse_duration(soak)),
        max_error_rate=max_error_rate,
        max_p99_ms=max_p99_ms,
        offline_policy=rollouts_pb2.OFFLINE_POLICY_SKIP
        if offline == "skip"
        else rollouts_pb2.OFFLINE_POLICY_FAIL,
        continuous=continuous,
        window=window.strip(),
        pause_after_waves=pause_after_wave,
        canary_traffic_percent=_percent(canary_traffic, "--canary-traffic"),
        shadow=shadow,
        min_agreement=min_agreement,
        max_p99_ratio=max_p99_ratio,
    )
    if start_at:
        spec.start_at.FromNanoseconds(int(parse_start_at(start_at, time.time()) * 1e9))
    selector = parse_selector(to)
    with connect(server, token, ca) as client:
        ref = artifact
        if Path(artifact).exists():
            with byte_progress(f"pushing {Path(artifact).name}", enabled=not json_out) as progress:
                pushed = push_artifact(client, Path(artifact), progress)
            ref = pushed.artifact.ref.digest
            if not json_out:
                console.print(
                    f"pushed {pushed.artifact.ref.name}:{pushed.artifact.ref.version} ({short_digest(ref)})"
                )
        request = rollouts_pb2.CreateRolloutRequest(
            artifact=ref,
            selector=common_pb2.Selector(match_labels=selector.labels, device_ids=list(selector.device_ids)),
            strategy=spec,
        )
        rollout = client.call(client.rollouts.Create, request)
        if not watch:
            if json_out:
                print_json(message_to_dict(rollout))
            else:
                console.print(f"rollout [bold]{rollout.id}[/] created: {_summary(rollout)}")
                if rollout.strategy.HasField("start_at"):
                    starts = rollout.strategy.start_at.ToDatetime().isoformat(timespec="seconds")
                    console.print(f"it starts at {starts} UTC (until then it is PENDING)")
                console.print(f"follow it with: edgectl rollout status {rollout.id} --watch")
            return
        final = watch_rollout(client, rollout.id, quiet=json_out)
    _finish(final, output_format(None, json_out))


def _percent(text: str, flag: str) -> float:
    """``10%`` or ``10`` as 10.0 ("" is 0); UsageError for anything else."""
    if not text.strip():
        return 0.0
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a percentage (e.g. 10%)") from None
    if not 0 < value <= 100:
        raise UsageError(f"{flag} {text!r} must be above 0% and at most 100%")
    return value


class RolloutFailedError(EdgectlError):
    """A rollout the command followed ended other than SUCCEEDED (failed, aborted, rolled back)."""

    exit_code = 5


def _following(r: rollouts_pb2.Rollout) -> bool:
    """A continuous rollout whose initial waves are done: it runs on, following its selector."""
    return (
        r.strategy.continuous
        and r.state == rollouts_pb2.ROLLOUT_STATE_RUNNING
        and bool(r.waves)
        and r.waves[-1].state == rollouts_pb2.WAVE_STATE_IN_PROGRESS
    )


def _finish(rollout: rollouts_pb2.Rollout, fmt: Output) -> None:
    """Print the rollout's end as ``fmt`` asks; RolloutFailedError (exit 5) unless it succeeded
    (or, continuous, follows its selector once its waves are done)."""
    machine = fmt in (Output.JSON, Output.YAML)
    if machine:
        show(fmt, message_to_dict(rollout), lambda wide: Table())
    state = enum_name(rollout.state, rollouts_pb2.RolloutState, "ROLLOUT_STATE_")
    if _following(rollout):
        if not machine:
            console.print(f"[green]rollout {rollout.id}: waves done, following its selector[/]")
        return
    if rollout.state != rollouts_pb2.ROLLOUT_STATE_SUCCEEDED:
        raise RolloutFailedError(
            f"rollout {rollout.id} ended {state}" + (f": {rollout.reason}" if rollout.reason else "")
        )
    if not machine:
        console.print(f"[green]rollout {rollout.id} succeeded[/]")


def _summary(r: rollouts_pb2.Rollout) -> str:
    devices = sum(len(w.devices) for w in r.waves)
    s = r.strategy
    trial = (
        f" as a {s.canary_traffic_percent:g}% canary" if s.canary_traffic_percent else " in shadow" * s.shadow
    )
    return (
        f"{r.artifact.name}:{r.artifact.version} to {devices} device(s) in {len(r.waves)} wave(s){trial}, "
        f"{enum_name(r.state, rollouts_pb2.RolloutState, 'ROLLOUT_STATE_')}"
    )


app = typer.Typer(help="Inspect and steer rollouts: ls, status, pause, resume, abort, rollback.")


@app.command("ls")
def rollout_ls(
    output: Output | None = OutputOpt,
    watch_: bool = WatchOpt,
    interval: float = IntervalOpt,
    limit: int = typer.Option(0, help="at most this many rollouts, newest first (0: all, every page)"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List rollouts, newest first.

    Example: edgectl rollout ls -o wide --watch
    """
    fmt = output_format(output, json_out)
    with connect(server, token, ca) as client:

        def fetch() -> tuple[Any, Callable[[bool], Table]]:
            rollouts = client.list_all(
                client.rollouts.List, rollouts_pb2.ListRolloutsRequest(), "rollouts", limit
            )
            return [message_to_dict(r) for r in rollouts], lambda wide: rollouts_table(rollouts, wide)

        if watch_:
            watch(fmt, fetch, interval)
            return
        data, table = fetch()
    show(fmt, data, table)


@app.command("status")
def rollout_status(
    rollout_id: str = typer.Argument(..., metavar="ID", help="rollout id"),
    watch_: bool = typer.Option(False, "--watch", "-w", help="follow it live until it ends"),
    output: Output | None = OutputOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
    ca: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show a rollout's waves and devices.

    Example: edgectl rollout status r-1a2b3c4d --watch
    """
    fmt = output_format(output, json_out)
    machine = fmt in (Output.JSON, Output.YAML)
    with connect(server, token, ca) as client:
        if watch_:
            _finish(watch_rollout(client, rollout_id, quiet=machine), fmt)
            return
        rollout = client.call(client.rollouts.Get, rollouts_pb2.GetRolloutRequest(id=rollout_id))
    show(fmt, message_to_dict(rollout), lambda wide: rollout_table(rollout, []))


def _action(action: str, summary: str) -> None:
    def command(
        rollout_id: str = typer.Argument(..., metavar="ID", help="rollout id"),
        reason: str = typer.Option("", help="why, for the rollout's log"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        ca: Path | None = CaOpt,
        json_out: bool = JsonOpt,
    ) -> None:
        with connect(server, token, ca) as client:
            method = getattr(client.rollouts, action.capitalize())
            rollout = client.call(method, rollouts_pb2.RolloutActionRequest(id=rollout_id, reason=reason))
        if json_out:
            print_json(message_to_dict(rollout))
        else:
            console.print(
                f"rollout {rollout.id}: {enum_name(rollout.state, rollouts_pb2.RolloutState, 'ROLLOUT_STATE_')}"
            )

    reason = "wave 1 looks good" if action == "resume" else "latency regression"
    command.__doc__ = f"{summary}\n\nExample: edgectl rollout {action} r-1a2b3c4d --reason '{reason}'"
    app.command(action)(command)


for _name, _summary_text in [
    ("pause", "Pause a rollout: the current wave finishes, the next does not start."),
    (
        "resume",
        "Resume a paused rollout (paused by hand or by deploy --pause-after-wave): the next wave starts"
        " (at --start-at, when that is still to come).",
    ),
    (
        "abort",
        "Stop a rollout (a continuous one stops following); devices already moved keep the new artifact.",
    ),
    ("rollback", "Stop a rollout and move every moved device back to its previous artifact."),
]:
    _action(_name, _summary_text)
