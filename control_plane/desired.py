"""Desired state: written to the store first (generation + 1), published retained afterwards.

The stored payload is exactly what goes on the wire, so republishing everything at start or
after a broker reconnect heals any publish that was lost between commit and send.

A secured control plane signs each state (``OrderSigner``): the generation is a per-device
counter that survives decommissioning (``order_counters``), inside the store's epoch, so a
re-enrolled device keeps counting up and an agent can refuse any order older than one it ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from edgectl.control_plane.db import Tx
from edgectl.control_plane.errors import NotFound
from edgectl.control_plane.fleet_key import FleetKeyring
from edgectl.mqtt.orders import Order, OrderedModel, sign
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import mqtt_pb2

DEFAULT_ORDER_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Publication:
    """One retained desired-state message, ready to send."""

    device_id: str
    payload: bytes
    generation: int = 0

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


@dataclass(frozen=True)
class OrderSigner:
    """Signs each desired state with the fleet key; an order expires ``ttl_s`` after it is issued."""

    keyring: FleetKeyring
    ttl_s: float = DEFAULT_ORDER_TTL_S


def fleet_epoch(tx: Tx, now: float) -> int:
    """The store's epoch: the second it first signed an order. Shared by every replica of the
    store and kept across restarts; a new store starts a later epoch, so agents follow it."""
    row = tx.one("SELECT epoch FROM fleet_epoch WHERE id = 1")
    if row is None:
        tx.execute(
            "INSERT INTO fleet_epoch (id, epoch) VALUES (1, ?) ON CONFLICT (id) DO NOTHING", (int(now),)
        )
        row = tx.one("SELECT epoch FROM fleet_epoch WHERE id = 1")
    assert row is not None
    return int(row[0])


def next_counter(tx: Tx, device_id: str) -> int:
    """The device's next order counter: never reused, not even after decommission and re-enrollment."""
    tx.execute(
        "INSERT INTO order_counters (device_id, counter) VALUES (?, 1) "
        "ON CONFLICT (device_id) DO UPDATE SET counter = order_counters.counter + 1",
        (device_id,),
    )
    return int(tx.scalar("SELECT counter FROM order_counters WHERE device_id = ?", (device_id,)))


def write_desired(
    tx: Tx,
    device_id: str,
    models: list[mqtt_pb2.DesiredModel],
    rollout_id: str,
    now: float | None = None,
    signer: OrderSigner | None = None,
) -> Publication:
    """Store the device's next desired state (the next counter) and return what to publish."""
    current_models(tx, device_id)  # NotFound for a device that is not in the inventory
    now = now if now is not None else time.time()
    generation = next_counter(tx, device_id)
    issued = Timestamp()
    issued.FromNanoseconds(int(now * 1e9))
    state = mqtt_pb2.DesiredState(
        device_id=device_id,
        generation=generation,
        models=sorted(models, key=lambda m: m.name),
        issued_at=issued,
        rollout_id=rollout_id,
        exclusive=True,  # the stored models are everything this device should serve
    )
    expires_at, key_id = None, ""
    if signer is not None:
        expires_at = now + signer.ttl_s
        order = Order(
            device_id, fleet_epoch(tx, now), generation, now, expires_at, rollout_id,
            tuple(OrderedModel(m.name, m.digest, m.version, m.rollback, m.window, m.canary_percent, m.shadow)
                  for m in state.models),
            exclusive=True,
        )  # fmt: skip
        key = signer.keyring.current()
        key_id = key.key_id
        state.signed.CopyFrom(sign(order.to_bytes(), key))
        state.key_rotations.extend(signer.keyring.rotations())
    payload = encode(state)
    tx.execute(
        "UPDATE devices SET generation = ?, desired = ?, order_expires_at = ?, order_key_id = ? WHERE id = ?",
        (generation, payload.decode(), expires_at, key_id, device_id),
    )
    return Publication(device_id, payload, generation)


def orders_to_refresh(tx: Tx, signer: OrderSigner, now: float) -> list[tuple[str, mqtt_pb2.DesiredState]]:
    """Stored states past half their lifetime, signed by a retired key, or never signed: each is
    re-signed before it expires, so a device that hears nothing new still holds a valid order."""
    rows = tx.all(
        "SELECT id, desired FROM devices WHERE desired <> '' AND "
        "(order_expires_at IS NULL OR order_expires_at < ? OR order_key_id <> ?) ORDER BY id",
        (now + signer.ttl_s / 2, signer.keyring.current().key_id),
    )
    return [(str(r[0]), decode(str(r[1]).encode(), mqtt_pb2.DesiredState)) for r in rows]


def with_model(
    models: list[mqtt_pb2.DesiredModel],
    name: str,
    digest: str,
    version: int,
    rollback: bool = False,
    window: str = "",
    canary_percent: float = 0.0,
    shadow: bool = False,
) -> list[mqtt_pb2.DesiredModel]:
    """``models`` with the entry for serving name ``name`` replaced (or added); an empty digest removes
    it. ``window``: swap only inside this maintenance window (a rollback never waits for one).
    ``canary_percent``/``shadow`` put the digest on trial beside what the device serves."""
    out = [m for m in models if m.name != name]
    if digest:
        entry = mqtt_pb2.DesiredModel(
            name=name, digest=digest, version=version, rollback=rollback, window=window
        )
        entry.canary_percent, entry.shadow = canary_percent, shadow
        out.append(entry)
    return out


def all_publications(tx: Tx) -> list[Publication]:
    """Every device's stored desired state, for the republish at start and after reconnects."""
    rows = tx.all("SELECT id, desired FROM devices WHERE desired <> '' ORDER BY id")
    return [Publication(r[0], str(r[1]).encode()) for r in rows]
