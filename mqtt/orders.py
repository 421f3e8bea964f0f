"""Signed orders: what the control plane tells one device to run, in bytes both sides agree on.

An order is canonical JSON (the artifact's encoding) naming the device, a per-device counter in
a control-plane epoch, when it was issued and when it expires, and each model's digest, version
and rollback flag. The control plane signs those bytes with its fleet key (Ed25519, distinct
from the artifact keys); the agent verifies them and acts on the payload alone. A key rotation
statement, signed by the key it retires, hands trust to the next fleet key. The crypto is
``edgectl.artifact.signing``'s; this module only fixes the two documents' formats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgectl.artifact.canonical import canonical_bytes, is_digest, parse_canonical
from edgectl.artifact.errors import ArtifactError
from edgectl.artifact.signing import SigningKey, TrustStore, key_id, load_public_key, public_pem
from edgectl.errors import EdgectlError
from edgectl.protos.v1 import mqtt_pb2

ORDER_FORMAT = "edgectl.order/v1"
ROTATION_FORMAT = "edgectl.fleet-key-rotation/v1"


class OrderError(EdgectlError):
    """A signed order or key rotation that does not verify or does not parse; the message says which."""


@dataclass(frozen=True)
class OrderedModel:
    """One serving name of an order: run exactly this digest (and version, when named)."""

    name: str
    digest: str
    version: int
    rollback: bool = False
    window: str = ""  # maintenance window for the swap (edgectl.window); "": at once
    # On-device trial beside the version served now (see DesiredModel in protos/v1/mqtt.proto).
    canary_percent: float = 0.0
    shadow: bool = False


@dataclass(frozen=True)
class Order:
    """The signed content of a desired state."""

    device_id: str
    epoch: int
    counter: int
    issued_at: float
    expires_at: float
    rollout_id: str
    models: tuple[OrderedModel, ...]
    exclusive: bool = False  # the models are all the device serves: any other name stops

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed."""
        extra = {"exclusive": True} if self.exclusive else {}  # absent when unset: the old bytes
        return canonical_bytes(
            {
                **extra,
                "format": ORDER_FORMAT,
                "device_id": self.device_id,
                "epoch": self.epoch,
                "counter": self.counter,
                "issued_at": round(self.issued_at, 3),
                "expires_at": round(self.expires_at, 3),
                "rollout_id": self.rollout_id,
                "models": [_model_doc(m) for m in self.models],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Order:
        """Parse canonical order bytes; OrderError for anything but a well-formed order."""
        try:
            doc = parse_canonical(data, what="signed order")
            if not isinstance(doc, dict) or doc.get("format") != ORDER_FORMAT:
                raise OrderError(f"signed payload is not an {ORDER_FORMAT} document")
            models = tuple(_model(m) for m in doc["models"])
            return cls(
                _typed(doc["device_id"], str), _typed(doc["epoch"], int), _typed(doc["counter"], int),
                float(_typed(doc["issued_at"], (int, float))), float(_typed(doc["expires_at"], (int, float))),
                _typed(doc["rollout_id"], str), models, _typed(doc.get("exclusive", False), bool),
            )  # fmt: skip
        except (ArtifactError, KeyError, TypeError) as exc:
            raise OrderError(f"signed order is malformed: {exc}") from exc

    def to_desired(self) -> mqtt_pb2.DesiredState:
        """The DesiredState this order means, built from the signed fields only."""
        state = mqtt_pb2.DesiredState(
            device_id=self.device_id,
            generation=self.counter,
            rollout_id=self.rollout_id,
            exclusive=self.exclusive,
        )
        state.issued_at.FromNanoseconds(int(self.issued_at * 1e9))
        for m in self.models:
            state.models.add(
                name=m.name, digest=m.digest, version=m.version, rollback=m.rollback, window=m.window,
                canary_percent=m.canary_percent, shadow=m.shadow,
            )  # fmt: skip
        return state

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires_at


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a counter of ``true`` is malformed, not 1.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise TypeError(f"{value!r} is not {kind}")
    return value


def _model_doc(m: OrderedModel) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": m.name, "digest": m.digest, "version": m.version, "rollback": m.rollback}
    if m.window:
        # Only when set: orders without a window keep the bytes they always had, and an agent that
        # predates windows ignores the key (it swaps at once) instead of failing to parse.
        doc["window"] = m.window
    # The trial keys likewise appear only when set (an agent that predates them swaps at once).
    if m.canary_percent:
        doc["canary_percent"] = m.canary_percent
    if m.shadow:
        doc["shadow"] = True
    return doc


def _model(obj: Any) -> OrderedModel:
    if not isinstance(obj, dict):
        raise TypeError("each model must be an object")
    digest = _typed(obj["digest"], str)
    if digest and not is_digest(digest):
        raise TypeError(f"model digest {digest!r} is not sha256:<64 hex>")
    percent = float(_typed(obj.get("canary_percent", 0), (int, float)))
    if not 0 <= percent <= 100:
        raise TypeError(f"canary_percent {percent} is not between 0 and 100")
    return OrderedModel(
        _typed(obj["name"], str), digest, _typed(obj["version"], int), _typed(obj["rollback"], bool),
        _typed(obj.get("window", ""), str), percent, _typed(obj.get("shadow", False), bool),
    )  # fmt: skip


def sign(payload: bytes, key: SigningKey) -> mqtt_pb2.SignedPayload:
    """``payload`` with the fleet key's Ed25519 signature over exactly those bytes."""
    sig = key.sign(payload)
    return mqtt_pb2.SignedPayload(payload=payload, key_id=sig.key_id, signature=sig.sig)


def verify(signed: mqtt_pb2.SignedPayload, trust: TrustStore, what: str = "desired state") -> bytes:
    """The payload, once a key in ``trust`` signed it; OrderError naming the reason otherwise."""
    if not signed.payload:
        raise OrderError(f"{what} is unsigned")
    key = trust.get(signed.key_id)
    if key is None:
        raise OrderError(
            f"{what} is signed by fleet key {signed.key_id or '?'}, which this device does not trust "
            f"(trusted: {', '.join(trust.key_ids()) or 'none'})"
        )
    try:
        key.verify(bytes(signed.signature), bytes(signed.payload))
    except InvalidSignature as exc:
        raise OrderError(f"{what}: the signature by fleet key {signed.key_id} does not verify") from exc
    return bytes(signed.payload)


@dataclass(frozen=True)
class KeyRotation:
    """Trust moves from ``previous_key_id`` to ``new_key``; signed by the previous key."""

    previous_key_id: str
    new_key: Ed25519PublicKey
    issued_at: float

    @property
    def new_key_id(self) -> str:
        return key_id(self.new_key)

    def to_bytes(self) -> bytes:
        return canonical_bytes(
            {
                "format": ROTATION_FORMAT,
                "previous_key_id": self.previous_key_id,
                "new_key": public_pem(self.new_key).decode("ascii"),
                "new_key_id": self.new_key_id,
                "issued_at": round(self.issued_at, 3),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRotation:
        try:
            doc = parse_canonical(data, what="fleet key rotation")
            if not isinstance(doc, dict) or doc.get("format") != ROTATION_FORMAT:
                raise OrderError(f"signed payload is not an {ROTATION_FORMAT} document")
            new_key = load_public_key(_typed(doc["new_key"], str).encode(), "the rotation's new key")
            rotation = cls(
                _typed(doc["previous_key_id"], str), new_key, float(_typed(doc["issued_at"], (int, float)))
            )
            if rotation.new_key_id != doc.get("new_key_id"):
                raise OrderError("fleet key rotation: new_key_id does not match new_key")
            return rotation
        except (ArtifactError, KeyError, TypeError) as exc:
            raise OrderError(f"fleet key rotation is malformed: {exc}") from exc


def apply_rotations(
    rotations: list[mqtt_pb2.SignedPayload], trust: TrustStore
) -> tuple[TrustStore, list[str]]:
    """Walk the rotation chain from the keys ``trust`` holds: each statement signed by a trusted
    key replaces that key by its successor. Returns (the resulting trust, the key ids added);
    ``trust`` itself is not changed, so a chain that fails (OrderError) changes nothing."""
    out = TrustStore(k for k in (trust.get(kid) for kid in trust.key_ids()) if k is not None)
    added: list[str] = []
    for signed in rotations:
        if signed.key_id not in out:
            continue  # a step this device is already past, or one that starts from a key it never had
        rotation = KeyRotation.from_bytes(verify(signed, out, "fleet key rotation"))
        if rotation.previous_key_id != signed.key_id:
            raise OrderError(
                f"fleet key rotation signed by {signed.key_id} retires {rotation.previous_key_id}: "
                "a key may only hand over its own trust"
            )
        out.remove(signed.key_id)
        added.append(out.add(rotation.new_key))
    return out, added
