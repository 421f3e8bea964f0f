"""edgectl.mqtt.orders: the signed-order and key-rotation formats: what verifies, and each way a forgery fails."""

from __future__ import annotations

import time

import pytest

from edgectl.artifact import SigningKey, TrustStore
from edgectl.artifact.canonical import canonical_bytes
from edgectl.mqtt.orders import (
    ORDER_FORMAT,
    KeyRotation,
    Order,
    OrderedModel,
    OrderError,
    apply_rotations,
    sign,
    verify,
)

DIGEST = "sha256:" + "ab" * 32


def _order(**kw: object) -> Order:
    now = time.time()
    base = dict(device_id="cam-1", epoch=7, counter=3, issued_at=now, expires_at=now + 60, rollout_id="r-1",
                models=(OrderedModel("m", DIGEST, 2, rollback=True),))  # fmt: skip
    base.update(kw)
    return Order(**base)  # type: ignore[arg-type]


def test_an_order_round_trips_through_its_signed_bytes() -> None:
    key = SigningKey.generate()
    order = _order()
    signed = sign(order.to_bytes(), key)
    parsed = Order.from_bytes(verify(signed, TrustStore([key.public_key])))
    assert parsed.models == order.models and parsed.counter == 3 and parsed.epoch == 7
    desired = parsed.to_desired()
    assert desired.generation == 3 and desired.models[0].rollback and desired.models[0].version == 2
    assert not parsed.expired() and parsed.expired(parsed.expires_at)


def test_forged_tampered_and_unsigned_orders_do_not_verify() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    trust = TrustStore([key.public_key])
    signed = sign(_order().to_bytes(), key)
    tampered = type(signed)()
    tampered.CopyFrom(signed)
    tampered.payload = _order(counter=2**62).to_bytes()  # same signature, bytes changed
    with pytest.raises(OrderError, match="does not verify"):
        verify(tampered, trust)
    with pytest.raises(OrderError, match="does not trust"):
        verify(sign(_order().to_bytes(), other), trust)
    claimed = sign(_order().to_bytes(), other)
    claimed.key_id = key.key_id
    with pytest.raises(OrderError, match="does not verify"):
        verify(claimed, trust)
    with pytest.raises(OrderError, match="unsigned"):
        verify(type(signed)(), trust)


@pytest.mark.parametrize(
    "doc, reason",
    [
        ({"counter": True}, "is not"),  # a boolean is not a counter
        ({"counter": "5"}, "is not"),
        ({"format": "edgectl.order/v0"}, "not an edgectl.order/v1"),
        ({"models": [{"name": "m", "digest": "md5:00", "version": 1, "rollback": False}]}, "sha256"),
        ({"models": [{"name": "m"}]}, "malformed"),
    ],
)
def test_malformed_orders_are_refused(doc: dict[str, object], reason: str) -> None:
    base: dict[str, object] = {"format": ORDER_FORMAT, "device_id": "d", "epoch": 1, "counter": 1, "issued_at": 1.0,
                               "expires_at": 2.0, "rollout_id": "", "models": []}  # fmt: skip
    base.update(doc)
    with pytest.raises(OrderError, match=reason):
        Order.from_bytes(canonical_bytes(base))
    with pytest.raises(OrderError, match="canonical"):
        Order.from_bytes(_order().to_bytes().replace(b",", b", ", 1))


def test_a_rotation_chain_moves_trust_one_signed_step_at_a_time() -> None:
    k1, k2, k3, evil = (SigningKey.generate() for _ in range(4))

    def step(old: SigningKey, new: SigningKey, signer: SigningKey | None = None):  # type: ignore[no-untyped-def]
        return sign(KeyRotation(old.key_id, new.public_key, time.time()).to_bytes(), signer or old)

    chain = [step(k1, k2), step(k2, k3)]
    trust = TrustStore([k1.public_key])
    moved, added = apply_rotations(chain, trust)
    assert moved.key_ids() == [k3.key_id] and added == [k2.key_id, k3.key_id]
    assert trust.key_ids() == [k1.key_id]  # the input is left as it was
    assert apply_rotations(chain, moved)[0].key_ids() == [k3.key_id]  # already past: nothing changes
    assert apply_rotations([step(k1, evil, evil)], trust)[1] == []  # signed by a stranger: ignored
    forged = step(k1, evil, evil)
    forged.key_id = k1.key_id
    with pytest.raises(OrderError, match="does not verify"):
        apply_rotations([forged], trust)
    with pytest.raises(OrderError, match="may only hand over its own trust"):
        apply_rotations([sign(KeyRotation(k2.key_id, evil.public_key, 0).to_bytes(), k1)], trust)
