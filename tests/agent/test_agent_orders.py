"""An agent given a fleet key with --fleet-key (a device enrolled before desired states were
signed) refuses unsigned states and follows signed ones, over a real broker and artifact server."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from edgectl.agent.agent import Agent
from edgectl.agent.errors import ConfigError, RefusedError
from edgectl.agent.orders import FLEET_KEYS_FILE, FleetTrust
from edgectl.artifact import SigningKey, TrustStore, public_pem
from edgectl.mqtt.orders import Order, OrderedModel, sign
from edgectl.mqtt.wire import encode
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, agent_config, wait_for


def test_a_pinned_fleet_key_refuses_unsigned_states_and_follows_signed_ones(
    rig: AgentRig, tmp_path: Path
) -> None:
    key = SigningKey.generate()
    pub = tmp_path / "fleet.pub.pem"
    pub.write_bytes(public_pem(key.public_key))
    d1 = rig.server.add(rig.bundles.build(version=1).root)
    agent: Agent = rig.agent(fleet_key=(pub,))
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))  # what an insecure plane sends
    wait_for(
        lambda: "is unsigned" in getattr(rig.fleet.latest(), "last_error", ""), what="the unsigned refusal"
    )
    assert not rig.fleet.latest().models  # type: ignore[union-attr]

    now = time.time()
    order = Order(rig.fleet.device_id, 1, 2, now, now + 60, "r-1", (OrderedModel("mlp", d1, 1),))
    state = mpb.DesiredState(device_id=rig.fleet.device_id, generation=2)
    state.signed.CopyFrom(sign(order.to_bytes(), key))
    rig.fleet.client.publish(rig.fleet.topics.desired, encode(state), retain=True)
    rig.fleet.wait_serving("mlp", d1)
    wait_for(lambda: not rig.fleet.latest().last_error, what="the refusal to clear")  # type: ignore[union-attr]
    kept = agent.config.data_dir / FLEET_KEYS_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert json.loads(kept.read_text())["keys"] == [pub.read_text()]


def test_a_missing_fleet_key_file_is_a_clear_error_and_the_kept_keys_rule(
    tmp_path: Path, trust_file: Path
) -> None:
    config = agent_config(tmp_path, trust_file, fleet_key=(tmp_path / "nope.pem",))
    with pytest.raises(ConfigError, match="cannot read --fleet-key"):
        FleetTrust.load(config.data_dir, None, config.fleet_key)
    # Once the data dir holds its keys (a rotation may have moved them on), a flag adds nothing.
    kept, flagged = SigningKey.generate(), tmp_path / "old.pub.pem"
    flagged.write_bytes(public_pem(SigningKey.generate().public_key))
    FleetTrust(config.data_dir / FLEET_KEYS_FILE, TrustStore([kept.public_key])).save()
    assert FleetTrust.load(config.data_dir, None, (flagged,)).keys.key_ids() == [kept.key_id]


def test_trust_moves_along_a_rotation_only_to_a_key_that_signed_an_order(tmp_path: Path) -> None:
    from edgectl.mqtt.orders import KeyRotation

    old, new = SigningKey.generate(), SigningKey.generate()
    trust = FleetTrust(tmp_path / FLEET_KEYS_FILE, TrustStore([old.public_key]))
    chain = [sign(KeyRotation(old.key_id, new.public_key, time.time()).to_bytes(), old)]

    def state(key: SigningKey, counter: int) -> mpb.DesiredState:
        now = time.time()
        out = mpb.DesiredState(device_id="dev-1", generation=counter, key_rotations=chain)
        out.signed.CopyFrom(sign(Order("dev-1", 1, counter, now, now + 60, "", ()).to_bytes(), key))
        return out

    # The chain announced ahead of the key that signs (a rotation still in progress): no move.
    assert trust.check(state(old, 1), "dev-1", (0, 0)).desired.generation == 1
    assert trust.keys.key_ids() == [old.key_id]
    # Signed by the announced key: trust moves, and is kept.
    assert trust.check(state(new, 2), "dev-1", (1, 1)).desired.generation == 2
    assert trust.keys.key_ids() == [new.key_id]
    assert FleetTrust.load(tmp_path, None).keys.key_ids() == [new.key_id]
    with pytest.raises(RefusedError, match="does not trust"):
        trust.check(state(old, 3), "dev-1", (1, 2))
