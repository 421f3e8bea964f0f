"""Continuous rollouts after their waves: follow the selector, one device at a time.

A continuous rollout's last wave belongs to its followers. Once the initial waves succeeded,
each step (1) judges the device in flight like any device, rolling it back alone when it fails
(the rollout goes on: a late joiner cannot fail what already succeeded); (2) sends every device
that no longer matches back to what it ran before and forgets it, so matching again makes it a
joiner anew; (3) adds every device that newly matches and no other active rollout holds; and
(4) moves the next online joiner when none is in flight. A paused rollout only judges.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.db import Tx
from edgectl.control_plane.desired import Publication

if TYPE_CHECKING:
    from edgectl.control_plane.controller import RolloutController

# Matching the selector reads every device row (about 80 ms for 10,000 devices on SQLite): at most
# every SCAN_INTERVAL_S per rollout, and never more than a tenth of the leader's time (monotonic
# time, not the rollout clock: it paces work and decides nothing).
SCAN_INTERVAL_S = 0.5
SCAN_SHARE = 0.1


def follow(
    ctrl: RolloutController, tx: Tx, r: rs.RolloutRecord, wave: rs.WaveRecord, now: float
) -> list[Publication]:
    """One step of a continuous rollout past its initial waves; returns what to publish."""
    idx = wave.idx
    if wave.state == rs.W_PENDING:
        if r.state == rs.PAUSED or now < r.strategy.start_at:
            return []
        rs.update_wave(tx, r.id, idx, state=rs.W_IN_PROGRESS, started_at=now)
        rs.add_event(
            tx, r.id, "following", now, idx,
            message=f"following {r.selector}: devices that match later move one at a time",
        )  # fmt: skip
    publications: list[Publication] = []
    in_flight = [p.device_id for p in rs.devices(tx, r.id, idx, (rs.D_DESIRED,))]
    ctrl.judge_wave(tx, r, idx, now)
    for p in rs.devices(tx, r.id, idx, (rs.D_FAILED,)):
        if p.device_id in in_flight:  # failed just now: back it goes, alone
            sent = ctrl.send_back(tx, r, p, now, why=f"late joiner failed ({p.reason}); ")
            publications += [sent] if sent else []
    if r.state == rs.PAUSED:
        return publications
    tick = time.monotonic()
    if tick < ctrl.scan_due.get(r.id, float("-inf")):
        return publications + _next(ctrl, tx, r, idx, now, None)
    matching = rs.matching_devices(tx, r.selector)
    took = time.monotonic() - tick
    ctrl.scan_due[r.id] = tick + max(SCAN_INTERVAL_S, took / SCAN_SHARE)
    rows = {p.device_id: p for p in rs.devices(tx, r.id)}
    for p in rows.values():
        if p.device_id in matching:
            continue
        if p.state in rs.MOVED:
            sent = ctrl.send_back(tx, r, p, now, why="left the selector; ")
            publications += [sent] if sent else []
        rs.remove_device(tx, r.id, p.device_id)
        rs.add_event(tx, r.id, "device_left", now, p.wave, p.device_id, "no longer matches the selector")
    busy = rs.busy_devices(tx)
    for device_id, online in matching.items():
        row = rows.get(device_id)
        if row is None and busy.get(device_id, r.id) == r.id:
            rs.add_device(tx, r.id, device_id, idx, now)
            rs.add_event(tx, r.id, "device_joined", now, idx, device_id, "matches the selector")
        elif row is not None and row.state == rs.D_SKIPPED and online:
            # Skipped while offline (or decommissioned and enrolled again): it is back, so it joins.
            rs.update_device(tx, r.id, device_id, now, wave=idx, state=rs.D_PENDING, reason="")
    size = len(rs.devices(tx, r.id, idx))
    if size != wave.size:
        rs.update_wave(tx, r.id, idx, size=size)
    return publications + _next(ctrl, tx, r, idx, now, matching)


def _next(
    ctrl: RolloutController,
    tx: Tx,
    r: rs.RolloutRecord,
    idx: int,
    now: float,
    matching: dict[str, bool] | None,
) -> list[Publication]:
    """Move the next online joiner, unless one is still in flight: late joiners go one by one."""
    if rs.devices(tx, r.id, idx, (rs.D_DESIRED,)):
        return []
    for p, live in rs.with_live(tx, r.id, (rs.D_PENDING,), idx):
        if live is None or not live.online or (matching is not None and p.device_id not in matching):
            continue
        publication = ctrl.move_device(tx, r, p.device_id, live, now)
        rs.add_event(tx, r.id, "device_moving", now, idx, p.device_id, "late joiner told to move")
        return [publication]
    return []
