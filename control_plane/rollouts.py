"""Rollouts as operators see them: create, inspect, pause, resume, abort, roll back.

These calls only write intent to the store (with an event); the leader's
:class:`~edgectl.control_plane.controller.RolloutController` acts on it. Any replica may
serve them, so nothing here publishes to MQTT.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.db import Tx
from edgectl.control_plane.errors import FailedPrecondition, InvalidArgument
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.store import StateStore
from edgectl.control_plane.strategy import StrategySpec, failure_budget
from edgectl.labels import Selector

# A --start-at this far in the past is a mistake (a typo, a stale script), not "now".
START_AT_SLACK_S = 300.0


def _plan(s: StrategySpec) -> str:
    """The schedule part of the "created" event, e.g. ", starts 2026-12-01 01:00 UTC, pauses after 1"."""
    parts = []
    if s.start_at:
        parts.append(f"starts {datetime.fromtimestamp(s.start_at, timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    if s.window:
        parts.append(f"swaps only in {s.window}")
    if s.pause_after_waves:
        parts.append(f"pauses after wave {', '.join(map(str, s.pause_after_waves))}")
    if s.continuous:
        parts.append("then follows the selector")
    return "".join(f", {p}" for p in parts)


class Rollouts:
    """Create and steer rollouts; reads serve Get, List and Watch."""

    def __init__(
        self,
        store: StateStore,
        artifacts: ArtifactStore,
        fleet: Fleet,
        wake: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clock = clock
        self.artifacts = artifacts
        self.fleet = fleet
        self._wake = wake or (lambda: None)
        self.changed = threading.Condition()  # notified on local writes, so Watch streams wake early

    def _notify(self) -> None:
        self._wake()
        with self.changed:
            self.changed.notify_all()

    def create(
        self, artifact_ref: str, selector: Selector, strategy: StrategySpec, created_by: str
    ) -> rs.RolloutView:
        """Validate, pick targets (online first, then by id) and store the rollout, pending."""
        if selector.empty:
            raise InvalidArgument(
                "the device selector is empty", hint="select devices by labels (site=lab) or ids (id=cam-07)"
            )
        strategy.validate(
            1, syntax_only=True
        )  # syntax first: a bad strategy is reported even when no device matches
        now = self.clock()
        if strategy.start_at and strategy.start_at < now - START_AT_SLACK_S:
            raise InvalidArgument(
                f"the start time is {now - strategy.start_at:.0f} s in the past",
                hint="give a future time, e.g. --start-at +2h, or leave --start-at out to start now",
            )
        artifact = self.artifacts.resolve(artifact_ref)
        self.artifacts.check_trusted(artifact)
        targets = self.fleet.list_devices(selector)
        if not targets and not strategy.continuous:
            raise FailedPrecondition(
                f"selector {selector} matches no device",
                hint="check labels with `edgectl devices ls`, or deploy --continuous to wait for devices",
            )
        sizes = strategy.validate(len(targets))
        targets.sort(key=lambda d: (not d.online, d.id))
        record = rs.RolloutRecord(
            "r-" + secrets.token_hex(4), artifact.digest, artifact.name, artifact.version, selector, strategy,
            rs.PENDING, 0, 0, "", 0, None, now, now, created_by,
        )  # fmt: skip
        with self.store.tx() as tx:
            busy = rs.busy_devices(tx)
            # A continuous rollout also holds the devices its selector matches but has not moved yet.
            for other in (rs.get(tx, i) for i in rs.active_ids(tx)):
                if other.strategy.continuous:
                    busy.update(
                        {d.id: other.id for d in targets if other.selector.matches(d.id, d.effective_labels)}
                    )
            clash = sorted(d.id for d in targets if d.id in busy)
            if clash:
                raise FailedPrecondition(
                    f"{len(clash)} selected device(s) are already in rollout {busy[clash[0]]} (e.g. {clash[0]})",
                    hint=f"wait for it to finish, or abort it: edgectl rollout abort {busy[clash[0]]}",
                )
            # A continuous rollout's extra, last wave holds the devices that match later.
            rs.insert(tx, record, sizes + [0] * strategy.continuous, [d.id for d in targets])
            budget = failure_budget(strategy.max_failures, len(targets))
            rs.add_event(
                tx, record.id, "created", now,
                message=f"{artifact.name}:{artifact.version} to {len(targets)} device(s) in {len(sizes)} wave(s), "
                f"failure budget {budget}{_plan(strategy)}",
            )  # fmt: skip
            view = rs.view(tx, record.id)
        self._notify()
        return view

    def get(self, rollout_id: str) -> rs.RolloutView:
        with self.store.tx() as tx:
            return rs.view(tx, rollout_id)

    def list_rollouts(self, states: list[int], offset: int = 0, limit: int = 100) -> list[rs.RolloutView]:
        with self.store.tx() as tx:
            records = rs.list_rollouts(tx, states, offset, limit)
            return [rs.RolloutView(r, rs.waves(tx, r.id), rs.devices(tx, r.id)) for r in records]

    def events_after(self, rollout_id: str, after_seq: int) -> list[rs.EventRecord]:
        with self.store.tx() as tx:
            rs.get(tx, rollout_id)
            return rs.events_after(tx, rollout_id, after_seq)

    # -- operator actions ---------------------------------------------------------------------

    def pause(self, rollout_id: str, reason: str = "") -> rs.RolloutView:
        return self._transition(
            rollout_id, (rs.PENDING, rs.RUNNING), rs.PAUSED, reason or "paused by operator"
        )

    def resume(self, rollout_id: str, reason: str = "") -> rs.RolloutView:
        # Before its --start-at nothing has run: it waits again as PENDING, not RUNNING with no wave.
        with self.store.tx() as tx:
            scheduled = self.clock() < rs.get(tx, rollout_id).strategy.start_at
        target = rs.PENDING if scheduled else rs.RUNNING
        return self._transition(rollout_id, (rs.PAUSED,), target, reason or "resumed by operator")

    def abort(self, rollout_id: str, reason: str = "") -> rs.RolloutView:
        return self._transition(
            rollout_id, (rs.PENDING, rs.RUNNING, rs.PAUSED), rs.ABORTED, reason or "aborted by operator"
        )

    def rollback(self, rollout_id: str, reason: str = "") -> rs.RolloutView:
        """Ask the controller to move every moved device back; the rollout ends ROLLED_BACK."""
        return self._transition(
            rollout_id,
            (rs.PENDING, rs.RUNNING, rs.PAUSED, rs.SUCCEEDED, rs.ABORTED),
            rs.ROLLING_BACK,
            reason or "rollback requested by operator",
        )

    def _transition(
        self, rollout_id: str, allowed: tuple[int, ...], target: int, reason: str
    ) -> rs.RolloutView:
        now = self.clock()
        with self.store.tx() as tx:
            current = rs.get(tx, rollout_id)
            if current.state not in allowed:
                names = ", ".join(rs.state_name(s) for s in allowed)
                raise FailedPrecondition(
                    f"rollout {rollout_id} is {rs.state_name(current.state)}; "
                    f"this action needs it to be {names}",
                    hint="see its state with `edgectl rollout status " + rollout_id + "`",
                )
            fields: dict[str, object] = {"state": target, "reason": reason}
            if target == rs.ROLLING_BACK:
                fields.update(stop_state=rs.ROLLED_BACK, stop_deadline=None)
            rs.update(tx, rollout_id, now, **fields)
            if target == rs.ABORTED:
                for p in rs.devices(tx, rollout_id, states=(rs.D_PENDING,)):
                    rs.update_device(
                        tx, rollout_id, p.device_id, now, state=rs.D_SKIPPED, reason="rollout aborted"
                    )
                self._close_open_wave(tx, rollout_id, now)
            rs.add_event(tx, rollout_id, "state_changed", now, message=f"{rs.state_name(target)}: {reason}")
            view = rs.view(tx, rollout_id)
        self._notify()
        return view

    @staticmethod
    def _close_open_wave(tx: Tx, rollout_id: str, now: float) -> None:
        for w in rs.waves(tx, rollout_id):
            if w.state == rs.W_IN_PROGRESS:
                rs.update_wave(tx, rollout_id, w.idx, state=rs.W_FAILED, finished_at=now)
