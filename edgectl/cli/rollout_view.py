"""How the CLI draws rollouts: the live table ``deploy --watch`` and ``rollout status --watch``
follow, and the ``rollout ls`` table."""

from __future__ import annotations

import time

import grpc
from rich.table import Table

from edgectl.cli.output import console
from edgectl.cli.remote import ago, enum_name
from edgectl.client import ControlPlaneClient
from edgectl.protos.v1 import rollouts_pb2


def rollout_table(r: rollouts_pb2.Rollout, events: list[str]) -> Table:
    state = enum_name(r.state, rollouts_pb2.RolloutState, "ROLLOUT_STATE_")
    table = Table(
        title=f"{r.id}  {r.artifact.name}:{r.artifact.version}  [bold]{state}[/]  failures {r.failures}"
    )
    for col in ("wave", "state", "devices", "healthy", "failed", "waiting", "other"):
        table.add_column(col)
    failed: list[str] = []
    waiting: list[str] = []
    for w in r.waves:
        counts = dict.fromkeys(("healthy", "failed", "desired"), 0)
        other = 0
        for d in w.devices:
            name = enum_name(d.state, rollouts_pb2.DeviceRolloutState, "DEVICE_ROLLOUT_STATE_")
            if name in counts:
                counts[name] += 1
            else:
                other += 1
            if d.state == rollouts_pb2.DEVICE_ROLLOUT_STATE_FAILED:
                failed.append(f"{d.device_id}: {d.reason}")
            elif d.state == rollouts_pb2.DEVICE_ROLLOUT_STATE_DESIRED and d.reason:
                waiting.append(f"{d.device_id}: {d.reason}")  # e.g. staged, waiting for the window
        table.add_row(
            str(w.index + 1), enum_name(w.state, rollouts_pb2.WaveState, "WAVE_STATE_"), str(len(w.devices)),
            str(counts["healthy"]), str(counts["failed"]), str(counts["desired"]), str(other),
        )  # fmt: skip
    caption = [f"failed: {f}" for f in failed[:5]] + [f"waiting: {w}" for w in waiting[:5]] + events[-5:]
    if r.reason:
        caption.insert(0, r.reason)
    table.caption = "\n".join(caption)
    return table


def watch_rollout(client: ControlPlaneClient, rollout_id: str, quiet: bool = False) -> rollouts_pb2.Rollout:
    """Follow the Watch stream, redrawing at most 4x a second; returns the final rollout."""
    from rich.console import Console
    from rich.live import Live

    events: list[str] = []
    get = rollouts_pb2.GetRolloutRequest(id=rollout_id)
    rollout: rollouts_pb2.Rollout = client.call(client.rollouts.Get, get)
    stream = client.rollouts.Watch(rollouts_pb2.WatchRolloutRequest(id=rollout_id))
    last_draw = 0.0
    # --json keeps stdout for the final document: the live view is not drawn at all.
    screen = Console(quiet=True) if quiet else console
    try:
        with Live(rollout_table(rollout, events), console=screen, transient=False) as live:
            for event in stream:
                where = f" {event.device_id}" if event.device_id else ""
                events.append(f"#{event.sequence} {event.kind}{where} {event.message}".rstrip())
                if event.kind == "following":
                    stream.cancel()
                    break  # a continuous rollout never ends on its own: its waves are done
                if time.monotonic() - last_draw > 0.25 or event.HasField("rollout"):
                    rollout = client.call(client.rollouts.Get, get)
                    live.update(rollout_table(rollout, events))
                    last_draw = time.monotonic()
            rollout = client.call(client.rollouts.Get, get)
            live.update(rollout_table(rollout, events))
    except grpc.RpcError as exc:
        raise client.error(exc) from None
    return rollout


def wave_at(r: rollouts_pb2.Rollout) -> str:
    """The wave column, "N/TOTAL": the last wave that has started (0 before any). Not
    ``current_wave``: paused after a wave, it already names the next one, which has not begun."""
    started = [w.index + 1 for w in r.waves if w.state != rollouts_pb2.WAVE_STATE_PENDING]
    return f"{max(started, default=0)}/{len(r.waves)}"


def rollouts_table(rollouts: list[rollouts_pb2.Rollout], wide: bool) -> Table:
    table = Table("id", "artifact", "state", "wave", "failures", "created", "reason",
                  *(("by", "selector", "strategy") if wide else ()))  # fmt: skip
    for r in rollouts:
        row = [
            r.id, f"{r.artifact.name}:{r.artifact.version}", enum_name(r.state, rollouts_pb2.RolloutState, "ROLLOUT_STATE_"),
            wave_at(r), str(r.failures), ago(r.created_at), r.reason,
        ]  # fmt: skip
        if wide:
            labels = ",".join(f"{k}={v}" for k, v in sorted(r.selector.match_labels.items()))
            ids = ",".join(f"id={d}" for d in r.selector.device_ids)
            row += [r.created_by or "-", ",".join(x for x in (labels, ids) if x), ",".join(r.strategy.waves)]
        table.add_row(*row)
    return table
