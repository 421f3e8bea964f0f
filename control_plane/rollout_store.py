"""Rollout persistence: rollouts, their waves, per-device progress and the append-only event log.

Every function runs inside a caller's transaction, so a state change and the event that
records it commit together: after a crash the log holds each step once, or not at all.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from edgectl.control_plane.db import Row, Tx
from edgectl.control_plane.desired import current_models
from edgectl.control_plane.device_state import ModelState
from edgectl.control_plane.errors import NotFound
from edgectl.control_plane.store import dumps, loads
from edgectl.control_plane.strategy import StrategySpec
from edgectl.labels import Selector
from edgectl.protos.v1 import rollouts_pb2 as rp

PENDING, RUNNING, PAUSED = rp.ROLLOUT_STATE_PENDING, rp.ROLLOUT_STATE_RUNNING, rp.ROLLOUT_STATE_PAUSED
SUCCEEDED, FAILED, ABORTED = rp.ROLLOUT_STATE_SUCCEEDED, rp.ROLLOUT_STATE_FAILED, rp.ROLLOUT_STATE_ABORTED
ROLLING_BACK, ROLLED_BACK = rp.ROLLOUT_STATE_ROLLING_BACK, rp.ROLLOUT_STATE_ROLLED_BACK
ACTIVE = (PENDING, RUNNING, PAUSED, ROLLING_BACK)
TERMINAL = (SUCCEEDED, FAILED, ABORTED, ROLLED_BACK)

W_PENDING, W_IN_PROGRESS = rp.WAVE_STATE_PENDING, rp.WAVE_STATE_IN_PROGRESS
W_SUCCEEDED, W_FAILED = rp.WAVE_STATE_SUCCEEDED, rp.WAVE_STATE_FAILED

D_PENDING, D_DESIRED, D_HEALTHY = (
    rp.DEVICE_ROLLOUT_STATE_PENDING, rp.DEVICE_ROLLOUT_STATE_DESIRED, rp.DEVICE_ROLLOUT_STATE_HEALTHY,
)  # fmt: skip
D_FAILED, D_SKIPPED, D_ROLLED_BACK = (
    rp.DEVICE_ROLLOUT_STATE_FAILED, rp.DEVICE_ROLLOUT_STATE_SKIPPED, rp.DEVICE_ROLLOUT_STATE_ROLLED_BACK,
)  # fmt: skip
MOVED = (D_DESIRED, D_HEALTHY, D_FAILED)  # devices whose desired state this rollout changed

_ROLLOUT_COLUMNS = (
    "id, artifact_digest, artifact_name, artifact_version, selector, strategy, state, current_wave, "
    "failures, reason, stop_state, stop_deadline, created_at, updated_at, created_by"
)
_DEVICE_COLUMNS = (
    "device_id, wave, state, previous_digest, previous_version, reason, updated_at, deadline, healthy_since, "
    "generation"
)


def state_name(state: int) -> str:
    """``RUNNING`` for ROLLOUT_STATE_RUNNING, for messages."""
    return rp.RolloutState.Name(rp.RolloutState.ValueType(state)).removeprefix("ROLLOUT_STATE_")


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout's own row."""

    id: str
    artifact_digest: str
    artifact_name: str
    artifact_version: int
    selector: Selector
    strategy: StrategySpec
    state: int
    current_wave: int
    failures: int
    reason: str
    stop_state: int
    stop_deadline: float | None
    created_at: float
    updated_at: float
    created_by: str

    @classmethod
    def from_row(cls, r: Row) -> RolloutRecord:
        return cls(
            r[0], r[1], r[2], int(r[3]), Selector.from_dict(loads(r[4], {})),
            StrategySpec.from_dict(loads(r[5], {})), int(r[6]), int(r[7]), int(r[8]), r[9], int(r[10]),
            float(r[11]) if r[11] is not None else None, float(r[12]), float(r[13]), r[14],
        )  # fmt: skip


@dataclass(frozen=True)
class WaveRecord:
    idx: int
    state: int
    size: int
    started_at: float | None
    finished_at: float | None


class ProgressRecord(NamedTuple):
    """One device's progress in a rollout (a tuple: a 500-device Get builds 500 of them, and a
    frozen dataclass cost 7x as much to build)."""

    device_id: str
    wave: int
    state: int
    previous_digest: str
    previous_version: int
    reason: str
    updated_at: float
    deadline: float | None
    healthy_since: float | None
    generation: int

    @classmethod
    def from_row(cls, r: Row) -> ProgressRecord:
        return cls(
            r[0], int(r[1]), int(r[2]), r[3], int(r[4]), r[5], float(r[6]),
            float(r[7]) if r[7] is not None else None, float(r[8]) if r[8] is not None else None, int(r[9]),
        )  # fmt: skip


@dataclass(frozen=True)
class LiveDevice:
    """What the controller needs of a device's reported state to judge it."""

    online: bool
    observed_generation: int
    models: dict[str, ModelState]
    stats: dict[str, float]
    desired: str


@dataclass(frozen=True)
class EventRecord:
    seq: int
    rollout_id: str
    at: float
    kind: str
    wave: int
    device_id: str
    message: str


@dataclass(frozen=True)
class RolloutView:
    """A rollout with its waves and devices, for Get and for the controller."""

    rollout: RolloutRecord
    waves: list[WaveRecord]
    devices: list[ProgressRecord]


def insert(tx: Tx, r: RolloutRecord, sizes: list[int], device_ids: list[str]) -> None:
    """Store a new rollout with its waves and every target device, pending."""
    tx.execute(
        f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r.id, r.artifact_digest, r.artifact_name, r.artifact_version, dumps(r.selector.to_dict()),
         dumps(r.strategy.to_dict()), r.state, r.current_wave, r.failures, r.reason, r.stop_state,
         r.stop_deadline, r.created_at, r.updated_at, r.created_by),
    )  # fmt: skip
    tx.executemany(
        "INSERT INTO rollout_waves (rollout_id, idx, state, size) VALUES (?, ?, ?, ?)",
        [(r.id, i, W_PENDING, size) for i, size in enumerate(sizes)],
    )
    rows: list[tuple[Any, ...]] = []
    position = 0
    for wave, size in enumerate(sizes):
        for device_id in device_ids[position : position + size]:
            rows.append((r.id, device_id, wave, D_PENDING, r.created_at))
        position += size
    tx.executemany(
        "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, updated_at) VALUES (?, ?, ?, ?, ?)",
        rows,
    )


def matching_devices(tx: Tx, selector: Selector) -> dict[str, bool]:
    """Device id -> online, for every device the selector matches now (a continuous rollout's scan).

    The labels matched are the fleet's effective labels: the agent's own, overridden by the operator's.
    """
    out: dict[str, bool] = {}
    for r in tx.all("SELECT id, labels, reported_labels, online FROM devices ORDER BY id"):
        if selector.matches(r[0], {**loads(r[2], {}), **loads(r[1], {})}):
            out[str(r[0])] = bool(r[3])
    return out


def add_device(tx: Tx, rollout_id: str, device_id: str, wave: int, now: float) -> None:
    """A device that joined a continuous rollout's selector, pending in ``wave``."""
    tx.execute(
        "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, updated_at) VALUES (?, ?, ?, ?, ?)",
        (rollout_id, device_id, wave, D_PENDING, now),
    )


def remove_device(tx: Tx, rollout_id: str, device_id: str) -> None:
    """Forget a device that left a continuous rollout's selector (the event log keeps its history)."""
    tx.execute("DELETE FROM rollout_devices WHERE rollout_id = ? AND device_id = ?", (rollout_id, device_id))


def get(tx: Tx, rollout_id: str) -> RolloutRecord:
    row = tx.one(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,))
    if row is None:
        raise NotFound(f"rollout {rollout_id} does not exist", hint="list rollouts with `edgectl rollout ls`")
    return RolloutRecord.from_row(row)


def view(tx: Tx, rollout_id: str) -> RolloutView:
    return RolloutView(get(tx, rollout_id), waves(tx, rollout_id), devices(tx, rollout_id))


def list_rollouts(tx: Tx, states: list[int], offset: int, limit: int) -> list[RolloutRecord]:
    where = f"WHERE state IN ({', '.join('?' for _ in states)})" if states else ""
    rows = tx.all(
        f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
        (*states, limit, offset),
    )
    return [RolloutRecord.from_row(r) for r in rows]


def active_ids(tx: Tx) -> list[str]:
    marks = ", ".join("?" for _ in ACTIVE)
    return [
        r[0] for r in tx.all(f"SELECT id FROM rollouts WHERE state IN ({marks}) ORDER BY created_at", ACTIVE)
    ]


def busy_devices(tx: Tx) -> dict[str, str]:
    """Device id -> the active rollout that holds it."""
    marks = ", ".join("?" for _ in ACTIVE)
    rows = tx.all(
        f"SELECT d.device_id, r.id FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id "
        f"WHERE r.state IN ({marks})",
        ACTIVE,
    )
    return {r[0]: r[1] for r in rows}


def waves(tx: Tx, rollout_id: str) -> list[WaveRecord]:
    rows = tx.all(
        "SELECT idx, state, size, started_at, finished_at FROM rollout_waves WHERE rollout_id = ? ORDER BY idx",
        (rollout_id,),
    )
    return [WaveRecord(int(r[0]), int(r[1]), int(r[2]), r[3], r[4]) for r in rows]


def devices(
    tx: Tx, rollout_id: str, wave: int | None = None, states: tuple[int, ...] = ()
) -> list[ProgressRecord]:
    sql = f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE rollout_id = ?"
    params: list[Any] = [rollout_id]
    if wave is not None:
        sql += " AND wave = ?"
        params.append(wave)
    if states:
        sql += f" AND state IN ({', '.join('?' for _ in states)})"
        params.extend(states)
    return [ProgressRecord.from_row(r) for r in tx.all(sql + " ORDER BY wave, device_id", params)]


def any_device(tx: Tx, rollout_id: str, wave: int, states: tuple[int, ...]) -> bool:
    """Whether wave ``wave`` still has a device in one of ``states`` (without reading them all)."""
    marks = ", ".join("?" for _ in states)
    return (
        tx.one(
            f"SELECT 1 FROM rollout_devices WHERE rollout_id = ? AND wave = ? AND state IN ({marks}) LIMIT 1",
            (rollout_id, wave, *states),
        )
        is not None
    )


def any_waiting(tx: Tx, device_ids: Collection[str]) -> bool:
    """Whether an active rollout waits for a verdict on any of ``device_ids`` (DESIRED)."""
    ids, marks = sorted(device_ids), ", ".join("?" for _ in ACTIVE)
    for i in range(0, len(ids), 500):  # bound the statement's parameters
        part = ids[i : i + 500]
        row = tx.one(
            f"SELECT 1 FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id WHERE d.state = ? "
            f"AND r.state IN ({marks}) AND d.device_id IN ({', '.join('?' for _ in part)}) LIMIT 1",
            (D_DESIRED, *ACTIVE, *part),
        )
        if row is not None:
            return True
    return False


def waiting(
    tx: Tx, rollout_id: str, wave: int, now: float, reported: Collection[str] | None
) -> list[tuple[ProgressRecord, LiveDevice | None]]:
    """The wave's devices waiting for a verdict (DESIRED) whose verdict may have changed: each one
    when ``reported`` is None; else those that reported since (``reported``), whose health deadline
    passed, whose soak runs, or that were decommissioned. A step so costs what changed, not the wave."""
    if reported is None:
        return with_live(tx, rollout_id, (D_DESIRED,), wave)
    rows = with_live(
        tx,
        rollout_id,
        (D_DESIRED,),
        wave,
        "p.deadline <= ? OR p.healthy_since IS NOT NULL OR d.id IS NULL",
        [now],
    )
    ids = sorted(set(reported) - {p.device_id for p, _ in rows})
    for i in range(0, len(ids), 500):  # bound the statement's parameters
        part = ids[i : i + 500]
        rows += with_live(
            tx, rollout_id, (D_DESIRED,), wave, f"p.device_id IN ({', '.join('?' for _ in part)})", part
        )
    return sorted(rows, key=lambda row: row[0].device_id)


def with_live(
    tx: Tx,
    rollout_id: str,
    states: tuple[int, ...],
    wave: int | None = None,
    where: str = "",
    where_params: Sequence[Any] = (),
) -> list[tuple[ProgressRecord, LiveDevice | None]]:
    """Progress rows joined with their device's live state in one query (None: decommissioned);
    ``where``: a further condition on ``p`` (progress) and ``d`` (device), with its parameters."""
    cols = ", ".join(f"p.{c.strip()}" for c in _DEVICE_COLUMNS.split(","))
    sql = (
        f"SELECT {cols}, d.id, d.online, d.observed_generation, d.models, d.stats, d.desired "
        f"FROM rollout_devices p LEFT JOIN devices d ON d.id = p.device_id "
        f"WHERE p.rollout_id = ? AND p.state IN ({', '.join('?' for _ in states)})"
    )
    params: list[Any] = [rollout_id, *states]
    if wave is not None:
        sql += " AND p.wave = ?"
        params.append(wave)
    if where:
        sql += f" AND ({where})"
        params.extend(where_params)
    out: list[tuple[ProgressRecord, LiveDevice | None]] = []
    for r in tx.all(sql + " ORDER BY p.device_id", params):
        progress = ProgressRecord.from_row(r[:10])
        live = None
        if r[10] is not None:
            models = {k: ModelState.from_dict(k, v) for k, v in loads(r[13], {}).items()}
            live = LiveDevice(bool(r[11]), int(r[12]), models, loads(r[14], {}), r[15])
        out.append((progress, live))
    return out


def update(tx: Tx, rollout_id: str, now: float, **fields: Any) -> None:
    """Set rollout columns (and updated_at)."""
    names = sorted(fields)
    sets = ", ".join(f"{n} = ?" for n in [*names, "updated_at"])
    tx.execute(f"UPDATE rollouts SET {sets} WHERE id = ?", (*[fields[n] for n in names], now, rollout_id))


def update_wave(tx: Tx, rollout_id: str, idx: int, **fields: Any) -> None:
    names = sorted(fields)
    sets = ", ".join(f"{n} = ?" for n in names)
    tx.execute(
        f"UPDATE rollout_waves SET {sets} WHERE rollout_id = ? AND idx = ?",
        (*[fields[n] for n in names], rollout_id, idx),
    )


def update_device(tx: Tx, rollout_id: str, device_id: str, now: float, **fields: Any) -> None:
    names = sorted(fields)
    sets = ", ".join(f"{n} = ?" for n in [*names, "updated_at"])
    tx.execute(
        f"UPDATE rollout_devices SET {sets} WHERE rollout_id = ? AND device_id = ?",
        (*[fields[n] for n in names], now, rollout_id, device_id),
    )


def add_event(
    tx: Tx, rollout_id: str, kind: str, now: float, wave: int = -1, device_id: str = "", message: str = ""
) -> None:
    tx.execute(
        "INSERT INTO rollout_events (rollout_id, at, kind, wave, device_id, message) VALUES (?, ?, ?, ?, ?, ?)",
        (rollout_id, now, kind, wave, device_id, message),
    )


def events_after(tx: Tx, rollout_id: str, after_seq: int, limit: int = 1000) -> list[EventRecord]:
    rows = tx.all(
        "SELECT seq, rollout_id, at, kind, wave, device_id, message FROM rollout_events "
        "WHERE rollout_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (rollout_id, after_seq, limit),
    )
    return [EventRecord(int(r[0]), r[1], float(r[2]), r[3], int(r[4]), r[5], r[6]) for r in rows]


def deployed_digests(tx: Tx, device_id: str) -> set[str]:
    """Artifacts a device may fetch: what its desired state names, and what rollouts moved it from."""
    _, models = current_models(tx, device_id)
    rows = tx.all("SELECT DISTINCT previous_digest FROM rollout_devices WHERE device_id = ? AND previous_digest <> ''",
                  (device_id,))  # fmt: skip
    return {m.digest for m in models} | {str(r[0]) for r in rows}


def counts(tx: Tx) -> dict[int, int]:
    """Rollouts by state, for metrics."""
    return {int(r[0]): int(r[1]) for r in tx.all("SELECT state, COUNT(*) FROM rollouts GROUP BY state")}
