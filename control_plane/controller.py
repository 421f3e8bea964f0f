"""The rollout controller: moves devices wave by wave, gates each wave on health, rolls back.

Only the leader runs it. Each step is one transaction that changes state and appends the
event recording it; desired-state messages are published only after the commit, and the
leader republishes every stored desired state when it starts, so a crash between commit and
publish loses nothing and a restart repeats no step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.db import Tx
from edgectl.control_plane.desired import (
    DesiredPublisher,
    OrderSigner,
    Publication,
    all_publications,
    current_models,
    orders_to_refresh,
    with_model,
    write_desired,
)
from edgectl.control_plane.errors import NotFound
from edgectl.control_plane.follow import follow
from edgectl.control_plane.store import StateStore
from edgectl.control_plane.strategy import failure_budget, parse_window
from edgectl.control_plane.trial_gate import trial_summary
from edgectl.control_plane.verdict import judge_device
from edgectl.protos.v1 import mqtt_pb2

log = logging.getLogger(__name__)
CLOCK_LOOK_S = 2.0  # devices due by the clock (health deadline passed, soak running) are judged this often
# Every waiting device is judged at least this often, reported or not: a backstop, since a verdict
# changes only with a report (which wakes the controller with its device) or with the clock.
FULL_JUDGE_S = 30.0


class RolloutController:
    """Steps every active rollout; ``step_all`` is called by the leader loop and by tests."""

    def __init__(
        self,
        store: StateStore,
        publisher: DesiredPublisher,
        clock: Callable[[], float] = time.time,
        on_wave_done: Callable[[float], None] | None = None,
        signer: OrderSigner | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self.on_wave_done = on_wave_done or (lambda seconds: None)
        self.signer = signer
        self._refreshed_at = float("-inf")
        self._promotions: list[Publication] = []  # trial devices promoted by the step in progress
        # Held from a write to its publish, and by republish_all: a republish read before a step's
        # commit can then never reach the broker after that step's newer order (agents would
        # refuse the older one as a replay, and it would stay retained).
        self._publishing = threading.Lock()
        self.scan_due: dict[str, float] = {}  # continuous rollout id -> next selector scan (monotonic)
        # Devices a step judges besides those due by the clock (None: every waiting device), and
        # those moved by the step in progress, judged again by the next whatever they report.
        self._reported: set[str] | None = None
        self._moved: set[str] = set()
        self._full_at = float("-inf")  # monotonic: when every waiting device was last judged
        self._looked_at = float("-inf")  # monotonic: when those due by the clock were last judged
        self.full_judge_s = FULL_JUDGE_S
        self.clock_look_s = CLOCK_LOOK_S

    def step_all(self, reported: set[str] | None = None) -> None:
        """Step every active rollout. ``reported``: the devices whose reports arrived since the last
        call (None: anything may have changed). Only those, those just moved, every ``clock_look_s``
        those due by the clock (health deadline passed, soak running) and every ``full_judge_s`` every
        waiting device are judged, so a step costs what changed, not the fleet; reports of devices
        that no rollout waits on (heartbeats) cause no step, and a tick with nothing to judge no
        transaction."""
        tick = time.monotonic()
        clock_look = tick >= self._looked_at + self.clock_look_s
        if clock_look:
            self._looked_at = tick
        if reported is None or tick >= self._full_at + self.full_judge_s:
            self._reported, self._full_at, clock_look = None, tick, True
        else:
            self._reported = reported | self._moved
        self._moved = set()
        try:
            if not clock_look and not self._reported:
                self.refresh_orders()  # nothing reported, nothing due: no transaction
                return
            with self.store.tx() as tx:
                ids = rs.active_ids(tx)
                # Reports of devices no rollout waits on (heartbeats, mostly) change no verdict: no step.
                if not clock_look and not rs.any_waiting(tx, self._reported or ()):
                    ids = []
            for rollout_id in ids:
                self.step(rollout_id)
            self.refresh_orders()
        except BaseException:
            # What a failed step would have judged is judged next time.
            self._full_at = self._looked_at = float("-inf")
            raise

    def refresh_orders(self) -> int:
        """Re-sign (new counter, new expiry, current fleet key) and republish every order that is
        past half its lifetime or signed by a retired key; checked at most every tenth of a lifetime."""
        now = self.clock()
        if self.signer is None or now - self._refreshed_at < min(60.0, self.signer.ttl_s / 10):
            return 0
        self._refreshed_at = now
        with self._publishing:
            with self.store.tx() as tx:
                publications = [
                    self._write(tx, device_id, list(state.models), state.rollout_id, now)
                    for device_id, state in orders_to_refresh(tx, self.signer, now)
                ]
            if publications:
                log.info("re-signed desired states", extra={"devices": len(publications)})
                self.publisher.publish_desired(publications)
        return len(publications)

    def _write(
        self, tx: Tx, device_id: str, models: list[mqtt_pb2.DesiredModel], rollout_id: str, now: float
    ) -> Publication:
        return write_desired(tx, device_id, models, rollout_id, now, self.signer)

    def step(self, rollout_id: str) -> None:
        """Advance one rollout as far as its devices' reports allow, then publish what changed."""
        with self._publishing:
            self._step(rollout_id)

    def republish_all(self) -> int:
        """Send every stored desired state again (after a broker reconnect); returns how many."""
        with self._publishing:
            with self.store.tx() as tx:
                publications = all_publications(tx)
            self.publisher.publish_desired(publications)
        return len(publications)

    def _step(self, rollout_id: str) -> None:
        now = self.clock()
        publications: list[Publication] = []
        self._promotions = []  # what judge_wave promotes in this transaction (lost if it rolls back)
        with self.store.tx() as tx:
            r = rs.get(tx, rollout_id)
            if r.state == rs.PENDING and now < r.strategy.start_at:
                return  # scheduled: --start-at has not come yet
            if r.state == rs.PENDING:
                rs.update(tx, r.id, now, state=rs.RUNNING)
                rs.add_event(tx, r.id, "state_changed", now, message="RUNNING")
                r = rs.get(tx, rollout_id)
            if r.state in (rs.RUNNING, rs.PAUSED):
                publications = self._advance(tx, r, now)
            elif r.state == rs.ROLLING_BACK:
                publications = self._roll_back(tx, r, now)
        publications = self._promotions + publications
        self._promotions = []
        if publications:
            self.publisher.publish_desired(publications)

    # -- moving forward -----------------------------------------------------------------------

    def _advance(self, tx: Tx, r: rs.RolloutRecord, now: float) -> list[Publication]:
        waves = rs.waves(tx, r.id)
        wave = waves[r.current_wave]
        if r.strategy.continuous and wave.idx == len(waves) - 1:
            return follow(self, tx, r, wave, now)
        if wave.state == rs.W_PENDING:
            if r.state == rs.PAUSED or now < r.strategy.start_at:
                return []
            return self._start_wave(tx, r, wave.idx, now)
        failures = r.failures + self.judge_wave(tx, r, wave.idx, now).count(rs.D_FAILED)
        if failures != r.failures:
            rs.update(tx, r.id, now, failures=failures)
        # A continuous rollout's last wave is its followers': the budget covers the initial set only.
        targets = sum(w.size for w in (waves[:-1] if r.strategy.continuous else waves))
        budget = failure_budget(r.strategy.max_failures, targets)
        if failures > budget:
            rs.update_wave(tx, r.id, wave.idx, state=rs.W_FAILED, finished_at=now)
            first = rs.devices(tx, r.id, states=(rs.D_FAILED,))[:1]
            example = f" (e.g. {first[0].device_id}: {first[0].reason})" if first else ""
            reason = f"{failures} device(s) failed{example}, over the failure budget of {budget}; moved devices rolled back"
            rs.update(
                tx, r.id, now, state=rs.ROLLING_BACK, stop_state=rs.FAILED, reason=reason, stop_deadline=None
            )
            rs.add_event(tx, r.id, "rollback_started", now, wave.idx, message=reason)
            return self._roll_back(tx, rs.get(tx, r.id), now)
        if rs.any_device(tx, r.id, wave.idx, (rs.D_PENDING, rs.D_DESIRED)):
            return []
        rs.update_wave(tx, r.id, wave.idx, state=rs.W_SUCCEEDED, finished_at=now)
        self.on_wave_done(now - (wave.started_at or now))
        rs.add_event(
            tx, r.id, "wave_succeeded", now, wave.idx, message=f"wave {wave.idx + 1}/{len(waves)} done"
        )
        if wave.idx + 1 >= len(waves):
            note = f"{failures} device(s) failed within the budget of {budget}" if failures else ""
            rs.update(tx, r.id, now, state=rs.SUCCEEDED, reason=note)
            rs.add_event(tx, r.id, "state_changed", now, message="SUCCEEDED" + (f": {note}" if note else ""))
            return []
        rs.update(tx, r.id, now, current_wave=wave.idx + 1)
        if wave.idx + 1 in r.strategy.pause_after_waves and r.state == rs.RUNNING:
            reason = f"paused after wave {wave.idx + 1}: check it, then `edgectl rollout resume {r.id}`"
            rs.update(tx, r.id, now, state=rs.PAUSED, reason=reason)
            rs.add_event(tx, r.id, "state_changed", now, wave.idx, message=f"PAUSED: {reason}")
            return []
        if r.state == rs.PAUSED:
            return []
        r = rs.get(tx, r.id)
        if r.strategy.continuous and wave.idx + 2 == len(waves):
            return follow(self, tx, r, waves[-1], now)
        return self._start_wave(tx, r, wave.idx + 1, now)

    def _promote(
        self,
        tx: Tx,
        r: rs.RolloutRecord,
        p: rs.ProgressRecord,
        live: rs.LiveDevice | None,
        wave: int,
        now: float,
    ) -> list[Publication]:
        """A device that passed its trial: the same digest without the trial fields, so the
        candidate becomes its only active version and the previous one drains."""
        _, models = current_models(tx, p.device_id)
        wanted = next((m for m in models if m.name == r.artifact_name), None)
        if (
            wanted is None
            or wanted.digest != r.artifact_digest
            or not (wanted.canary_percent or wanted.shadow)
        ):
            return []
        models = with_model(models, r.artifact_name, r.artifact_digest, r.artifact_version)
        rs.add_event(tx, r.id, "device_promoted", now, wave, p.device_id, trial_summary(r, live))
        return [self._write(tx, p.device_id, models, r.id, now)]

    def judge_wave(self, tx: Tx, r: rs.RolloutRecord, idx: int, now: float) -> list[int]:
        """Judge every device of wave ``idx`` still waiting; returns the verdicts that were final."""
        final: list[int] = []
        for progress, live in rs.waiting(tx, r.id, idx, now, self._reported):
            verdict = judge_device(r, progress, live, now)
            if verdict.soak_started:
                rs.update_device(tx, r.id, progress.device_id, now, healthy_since=now)
            if verdict.state == rs.D_DESIRED:
                if verdict.reason != progress.reason:  # e.g. "staged, waiting for ..." for `rollout status`
                    rs.update_device(tx, r.id, progress.device_id, now, reason=verdict.reason)
                continue
            rs.update_device(tx, r.id, progress.device_id, now, state=verdict.state, reason=verdict.reason)
            kinds: dict[int, str] = {rs.D_HEALTHY: "device_healthy", rs.D_FAILED: "device_failed"}
            kind = kinds.get(verdict.state, "device_skipped")
            rs.add_event(tx, r.id, kind, now, idx, progress.device_id, verdict.reason)
            final.append(verdict.state)
            if verdict.state == rs.D_HEALTHY and r.strategy.trial:
                self._promotions.extend(self._promote(tx, r, progress, live, idx, now))
        return final

    def _start_wave(self, tx: Tx, r: rs.RolloutRecord, idx: int, now: float) -> list[Publication]:
        publications: list[Publication] = []
        for progress, live in rs.with_live(tx, r.id, (rs.D_PENDING,), idx):
            if live is None:
                rs.update_device(
                    tx, r.id, progress.device_id, now, state=rs.D_SKIPPED, reason="decommissioned"
                )
                rs.add_event(tx, r.id, "device_skipped", now, idx, progress.device_id, "decommissioned")
                continue
            publications.append(self.move_device(tx, r, progress.device_id, live, now))
        rs.update_wave(tx, r.id, idx, state=rs.W_IN_PROGRESS, started_at=now)
        rs.add_event(
            tx, r.id, "wave_started", now, idx, message=f"{len(publications)} device(s) told to move"
        )
        return publications

    def move_device(
        self, tx: Tx, r: rs.RolloutRecord, device_id: str, live: rs.LiveDevice, now: float
    ) -> Publication:
        """Tell one device to run the rollout's artifact and start its health clock."""
        window = parse_window(r.strategy.window)
        # Inside a maintenance window the device swaps only once it opens: the clock starts then.
        deadline = (window.next_open(now) if window else now) + r.strategy.health_timeout_s
        _, models = current_models(tx, device_id)
        active = live.models.get(r.artifact_name)
        wanted = next((m for m in models if m.name == r.artifact_name), None)
        # What to go back to: what the device serves, else what it was told to serve.
        prev_digest = active.digest if active and active.digest else (wanted.digest if wanted else "")
        prev_version = active.version if active and active.digest else (wanted.version if wanted else 0)
        # A trial needs a current version to run beside (and one that is not already this artifact).
        trial = r.strategy.trial and prev_digest not in ("", r.artifact_digest)
        models = with_model(
            models, r.artifact_name, r.artifact_digest, r.artifact_version, window=r.strategy.window,
            canary_percent=r.strategy.canary_percent if trial else 0.0, shadow=r.strategy.shadow and trial,
        )  # fmt: skip
        publication = self._write(tx, device_id, models, r.id, now)
        self._moved.add(device_id)
        rs.update_device(
            tx, r.id, device_id, now, state=rs.D_DESIRED, previous_digest=prev_digest,
            previous_version=prev_version, deadline=deadline, generation=publication.generation,
            healthy_since=None,
        )  # fmt: skip
        return publication

    # -- moving back --------------------------------------------------------------------------

    def _roll_back(self, tx: Tx, r: rs.RolloutRecord, now: float) -> list[Publication]:
        publications: list[Publication] = []
        for p in rs.devices(tx, r.id, states=(rs.D_PENDING,)):
            rs.update_device(tx, r.id, p.device_id, now, state=rs.D_SKIPPED, reason="rollout stopped")
        for p, live in rs.with_live(tx, r.id, rs.MOVED):
            if live is None:
                rs.update_device(tx, r.id, p.device_id, now, state=rs.D_SKIPPED, reason="decommissioned")
                continue
            publication = self.send_back(tx, r, p, now)
            if publication is not None:
                publications.append(publication)
        if publications or r.stop_deadline is None:
            rs.update(tx, r.id, now, stop_deadline=now + r.strategy.health_timeout_s)
            return publications
        pending = [
            p.device_id
            for p, live in rs.with_live(tx, r.id, (rs.D_ROLLED_BACK,))
            if live is not None and not self._is_back(r, p, live)
        ]
        if pending and now < r.stop_deadline:
            return []
        final = r.stop_state or rs.ROLLED_BACK
        note = f"; {len(pending)} device(s) did not confirm, e.g. {pending[0]}" if pending else ""
        self._close_waves(tx, r.id, now)
        rs.update(tx, r.id, now, state=final, reason=r.reason + note)
        rs.add_event(tx, r.id, "state_changed", now, message=f"{rs.state_name(final)}: {r.reason}{note}")
        return []

    def send_back(
        self, tx: Tx, r: rs.RolloutRecord, p: rs.ProgressRecord, now: float, why: str = ""
    ) -> Publication | None:
        """Move one device back to what it ran before this rollout (ROLLED_BACK); None when a later
        rollout already moved it on (SKIPPED: going back would undo that one) or it is gone."""
        try:
            _, models = current_models(tx, p.device_id)
        except NotFound:
            return None
        wanted = next((m for m in models if m.name == r.artifact_name), None)
        if wanted is None or wanted.digest != r.artifact_digest:
            rs.update_device(
                tx, r.id, p.device_id, now, state=rs.D_SKIPPED, reason="moved on by a later rollout"
            )
            return None
        models = with_model(models, r.artifact_name, p.previous_digest, p.previous_version, rollback=True)
        publication = self._write(tx, p.device_id, models, r.id, now)
        back_to = f"{why}back to {p.previous_digest or 'nothing (model removed)'}"
        rs.update_device(tx, r.id, p.device_id, now, state=rs.D_ROLLED_BACK, reason=back_to)
        rs.add_event(tx, r.id, "device_rolled_back", now, p.wave, p.device_id, back_to)
        return publication

    @staticmethod
    def _is_back(r: rs.RolloutRecord, p: rs.ProgressRecord, live: rs.LiveDevice) -> bool:
        model = live.models.get(r.artifact_name)
        if not p.previous_digest:
            return model is None or model.digest != r.artifact_digest
        return model is not None and model.digest == p.previous_digest

    @staticmethod
    def _close_waves(tx: Tx, rollout_id: str, now: float) -> None:
        for w in rs.waves(tx, rollout_id):
            if w.state in (rs.W_IN_PROGRESS, rs.W_PENDING):
                rs.update_wave(tx, rollout_id, w.idx, state=rs.W_FAILED, finished_at=now)
