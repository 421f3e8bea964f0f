"""The agent's check of every desired state: signed by a trusted fleet key, for this device,
not expired, and newer than the last order it accepted.

The fleet keys come with enrollment and are kept 0600 in ``fleet-keys.json``; a key rotation
statement signed by a trusted key moves that trust to the next key (and the file with it). An
agent with no fleet key (insecure dev mode, or enrolled by a control plane without one)
accepts unsigned states and says so once in its log. A refused state is a ``RefusedError``
whose message becomes the reported ``last_error`` and a REFUSED event.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from edgectl.agent.errors import ConfigError, RefusedError
from edgectl.artifact import KeyFileError, TrustStore
from edgectl.artifact.signing import load_public_key, public_pem
from edgectl.durable import atomic_write
from edgectl.mqtt.orders import Order, OrderError, apply_rotations, verify
from edgectl.protos.v1 import fleet_pb2 as fpb
from edgectl.protos.v1 import mqtt_pb2 as mpb

log = logging.getLogger(__name__)
FLEET_KEYS_FILE = "fleet-keys.json"
FLEET_KEYS_FORMAT = "edgectl.fleet-keys/v1"


@dataclass(frozen=True)
class AcceptedOrder:
    """A desired state the agent may act on, rebuilt from what was signed, and its place in order."""

    desired: mpb.DesiredState
    epoch: int = 0
    expires_at: float | None = None  # None: unsigned (no fleet key configured)

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.desired.generation)


class FleetTrust:
    """The fleet keys this agent trusts for desired states, persisted in the data dir."""

    def __init__(self, path: Path, keys: TrustStore) -> None:
        self.path = path
        self.keys = keys

    @classmethod
    def load(
        cls, data_dir: Path, creds: fpb.DeviceCredentials | None, seed: tuple[Path, ...] = ()
    ) -> FleetTrust:
        """``fleet-keys.json``, else the keys enrollment handed over and the ``seed`` key files
        (written there on first use). Once the file exists it rules: a flag never brings back a
        key that a signed rotation retired."""
        path = data_dir / FLEET_KEYS_FILE
        keys = TrustStore()
        try:
            if path.exists():
                doc = json.loads(path.read_text())
                if not isinstance(doc, dict) or doc.get("format") != FLEET_KEYS_FORMAT:
                    raise ValueError(f"not an {FLEET_KEYS_FORMAT} document")
                for i, pem in enumerate(doc["keys"]):
                    keys.add(load_public_key(str(pem).encode(), f"{path} key {i}"))
                return cls(path, keys)
            for i, raw in enumerate(creds.fleet_keys if creds else []):
                keys.add(load_public_key(bytes(raw), f"credentials.json fleet key {i}"))
            for key_file in seed:
                try:
                    data = key_file.read_bytes()
                except OSError as exc:
                    raise ConfigError(f"cannot read --fleet-key {key_file}: {exc.strerror}") from exc
                keys.add(load_public_key(data, f"--fleet-key {key_file}"))
        except (OSError, ValueError, KeyError, TypeError, KeyFileError) as exc:
            raise ConfigError(
                f"cannot read the fleet keys {path}: {exc}",
                hint="enroll the device again (a new token) to get the fleet's key",
            ) from exc
        trust = cls(path, keys)
        if len(keys):
            trust.save()
        return trust

    @property
    def required(self) -> bool:
        """True when desired states must be signed (this agent holds a fleet key)."""
        return len(self.keys) > 0

    def save(self) -> None:
        pems = [public_pem(k).decode("ascii") for k in (self.keys.get(i) for i in self.keys.key_ids()) if k]
        doc = {"format": FLEET_KEYS_FORMAT, "keys": pems}
        atomic_write(self.path, json.dumps(doc, indent=1).encode(), 0o600)

    def check(
        self, desired: mpb.DesiredState, device_id: str, last: tuple[int, int], now: float | None = None
    ) -> AcceptedOrder:
        """The order ``desired`` carries, or RefusedError saying why it must not be followed.

        ``last`` is the (epoch, counter) of the newest order accepted so far; an equal one is the
        same order delivered again (a retained message after a reconnect) and is accepted.
        """
        if not self.required:
            return AcceptedOrder(desired)
        if not desired.HasField("signed") or not desired.signed.payload:
            raise RefusedError(
                f"desired state generation {desired.generation} is unsigned; this device accepts only "
                f"states signed by fleet key {', '.join(self.keys.key_ids())}"
            )
        try:
            self._rotate(list(desired.key_rotations), desired.signed.key_id)
            order = Order.from_bytes(verify(desired.signed, self.keys))
        except OrderError as exc:
            raise RefusedError(str(exc)) from exc
        now = now if now is not None else time.time()
        if order.device_id != device_id:
            raise RefusedError(f"signed desired state is addressed to {order.device_id!r}, not {device_id!r}")
        if order.expired(now):
            raise RefusedError(
                f"signed desired state counter {order.counter} expired "
                f"{now - order.expires_at:.0f} s ago: is it replayed, or is the control plane down?"
            )
        if order.epoch < last[0]:
            raise RefusedError(
                f"signed desired state is from control-plane epoch {order.epoch}, older than {last[0]}"
            )
        if (order.epoch, order.counter) < last:
            raise RefusedError(
                f"replayed desired state: counter {order.counter} is older than {last[1]} "
                f"already accepted in epoch {order.epoch}"
            )
        for m in order.models:
            if m.rollback and not m.version:
                raise RefusedError(f"{m.name}: a signed rollback must name the version it returns to")
        return AcceptedOrder(order.to_desired(), order.epoch, order.expires_at)

    def _rotate(self, rotations: list[mpb.SignedPayload], signer: str) -> None:
        """Follow the rotation chain only to trust the key that signed this order: trust never
        moves to a key this device has not seen sign one."""
        if not rotations or signer in self.keys:
            return
        keys, added = apply_rotations(rotations, self.keys)
        if added and signer in keys:
            self.keys = keys
            self.save()
            log.warning("fleet key rotated: now trusting %s", ", ".join(self.keys.key_ids()))
