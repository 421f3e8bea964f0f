"""Desired state: written to the store first (generation + 1), published retained afterwards.

The stored payload is exactly what goes on the wire, so republishing everything at start or
after a broker reconnect heals any publish that was lost between commit and send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from edgectl.control_plane.db import Tx
from edgectl.control_plane.errors import NotFound
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import mqtt_pb2


@dataclass(frozen=True)
class Publication:
    """One retained desired-state message, ready to send."""

    device_id: str
    payload: bytes

    @property
    def topic(self) -> str:
        return DeviceTopics(self.device_id).desired


class DesiredPublisher(Protocol):
    """Where desired state goes after it is committed (the MQTT bus)."""

    def publish_desired(self, publications: list[Publication]) -> None:
        """Send each payload retained, QoS 1, on its device's desired topic."""
        ...


def current_models(tx: Tx, device_id: str) -> tuple[int, list[mqtt_pb2.DesiredModel]]:
    """(generation, models) of the device's desired state as stored."""
    row = tx.one("SELECT generation, desired FROM devices WHERE id = ?", (device_id,))
    if row is None:
        raise NotFound(f"device {device_id} is not in the inventory")
    if not row[1]:
        return int(row[0]), []
    state = decode(str(row[1]).encode(), mqtt_pb2.DesiredState)
    return int(row[0]), list(state.models)


def write_desired(
    tx: Tx, device_id: str, models: list[mqtt_pb2.DesiredModel], rollout_id: str, now: float | None = None
) -> Publication:
    """Store the device's next desired state (generation + 1) and return what to publish."""
    generation, _ = current_models(tx, device_id)
    issued = Timestamp()
    issued.FromNanoseconds(int((now if now is not None else time.time()) * 1e9))
    state = mqtt_pb2.DesiredState(
        device_id=device_id,
        generation=generation + 1,
        models=sorted(models, key=lambda m: m.name),
        issued_at=issued,
        rollout_id=rollout_id,
    )
    payload = encode(state)
    tx.execute(
        "UPDATE devices SET generation = ?, desired = ? WHERE id = ?",
        (generation + 1, payload.decode(), device_id),
    )
    return Publication(device_id, payload)


def with_model(
    models: list[mqtt_pb2.DesiredModel], name: str, digest: str, version: int, rollback: bool = False
) -> list[mqtt_pb2.DesiredModel]:
    """``models`` with the entry for serving name ``name`` replaced (or added); an empty digest removes it."""
    out = [m for m in models if m.name != name]
    if digest:
        out.append(mqtt_pb2.DesiredModel(name=name, digest=digest, version=version, rollback=rollback))
    return out


def all_publications(tx: Tx) -> list[Publication]:
    """Every device's stored desired state, for the republish at start and after reconnects."""
    rows = tx.all("SELECT id, desired FROM devices WHERE desired <> '' ORDER BY id")
    return [Publication(r[0], str(r[1]).encode()) for r in rows]
