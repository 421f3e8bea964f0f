"""Issue 17 rows 2, 3 and 15: desired state is signed, and each attack on it fails.

A real mosquitto running `edgectl broker config`'s files, a real secured control plane (its
fleet key signs every order, orders expire after ``TTL`` seconds and are re-signed before), and
real agents that enroll. The attacker holds the control plane's broker credentials (a leaked
broker password): it can publish any desired state on any device's topic, retained. Each
attack has its positive control: the legitimate path through the control plane still works.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgectl.agent.agent import Agent
from edgectl.agent.config import AgentConfig
from edgectl.agent.orders import FLEET_KEYS_FILE
from edgectl.artifact import SigningKey
from edgectl.client import push_artifact
from edgectl.control_plane.fleet_key import FLEET_KEY_FILE
from edgectl.mqtt.orders import KeyRotation, Order, OrderedModel, sign
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import common_pb2, fleet_pb2
from edgectl.protos.v1 import mqtt_pb2 as mpb
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.tokens import Role
from tests.agent.onnx_models import mlp_artifact
from tests.control_plane.sim_device import wait_for
from tests.harness.mqtt import MqttTestClient
from tests.security.conftest import SecuredFleet, secured_fleet

TTL = 6.0  # seconds a signed order lives; the controller re-signs at half of it
NAME = "signed-mlp"


@dataclass
class Rig:
    fleet: SecuredFleet
    digests: dict[int, str]  # version -> digest of NAME

    @property
    def fleet_key_id(self) -> str:
        assert self.fleet.cp.security is not None
        return self.fleet.cp.security.fleet_key.current().key_id

    def attacker(self) -> MqttTestClient:
        """An MQTT client with the control plane's own broker login (the leaked credential)."""
        layout = self.fleet.layout
        client = self.fleet.mqtt(layout.control_plane_username, layout.control_plane_password)
        assert not client.connect(timeout=15).is_failure
        return client


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("signed")
    with secured_fleet(work, order_ttl_s=TTL) as fleet:
        digests = {}
        with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
            for version in (1, 2, 3):
                art = mlp_artifact(work / f"art-{version}", work, fleet.key, name=NAME, version=version,
                                   seeds=[version, 10 + version])  # fmt: skip
                digests[version] = push_artifact(deployer, art.root).artifact.ref.digest
        yield Rig(fleet, digests)


class Device:
    """One enrolled agent, driven through the control plane's API like an operator would."""

    def __init__(
        self, rig: Rig, device_id: str, data_dir: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.rig, self.id, self.data_dir = rig, device_id, data_dir
        self.clock = clock  # the agent's wall clock for maintenance windows
        self.topics = DeviceTopics(device_id)
        self.agent: Agent | None = None
        self.start()

    def start(self) -> None:
        fleet = self.rig.fleet
        with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
            token = admin.fleet.CreateEnrollmentToken(
                fleet_pb2.CreateEnrollmentTokenRequest(device_id=self.id, labels={"dev": self.id})
            ).token
        config = AgentConfig(
            device_id=self.id, data_dir=self.data_dir, listen="127.0.0.1:0", profile="x86-cpu-avx2",
            heartbeat_s=1.0, intra_op_threads=1, transport="grpc", control_plane=fleet.cp.device_address,
            enroll_server=fleet.cp.address, enroll_token=token, ca_file=fleet.layout.ca_cert,
        ).validate()  # fmt: skip
        self.agent = Agent(config, clock=self.clock)
        self.agent.start()
        wait_for(lambda: self.record().online, 20, what=f"{self.id} online")

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def record(self):  # type: ignore[no-untyped-def]
        return self.rig.fleet.cp.fleet.get(self.id)

    def serves(self, version: int) -> bool:
        model = self.record().models.get(NAME)
        return model is not None and model.digest == self.rig.digests[version] and model.smoke_test_passed

    def deploy(self, version: int) -> str:
        """Roll ``version`` out to this device alone; returns the rollout id once it succeeded."""
        fleet = self.rig.fleet
        with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
            rollout = deployer.rollouts.Create(RP.CreateRolloutRequest(
                artifact=self.rig.digests[version], selector=common_pb2.Selector(match_labels={"dev": self.id}),
                strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=60),
            ))  # fmt: skip
            done = (RP.ROLLOUT_STATE_SUCCEEDED, RP.ROLLOUT_STATE_FAILED, RP.ROLLOUT_STATE_ROLLED_BACK)
            wait_for(lambda: deployer.rollouts.Get(RP.GetRolloutRequest(id=rollout.id)).state in done, 60,
                     interval=0.2, what=f"rollout of version {version} to {self.id}")  # fmt: skip
            final = deployer.rollouts.Get(RP.GetRolloutRequest(id=rollout.id))
        assert final.state == RP.ROLLOUT_STATE_SUCCEEDED, final.reason
        assert self.serves(version)
        return str(rollout.id)

    def retained_desired(self) -> mpb.DesiredState:
        """What the control plane last sent this device, byte for byte (the device itself, or a
        wiretap on its subtree, sees the same: the control plane's login may not subscribe there)."""
        return decode(str(self.record().desired).encode(), mpb.DesiredState)

    def publish(self, state: mpb.DesiredState) -> None:
        """Publish as the attacker: retained, on the device's desired topic."""
        client = self.rig.attacker()
        try:
            client.client.publish(self.topics.desired, encode(state), qos=1, retain=True).wait_for_publish(10)
        finally:
            client.close()

    def refused(self, fragment: str, timeout: float = 15.0) -> str:
        """Wait until the device reports a refused desired state whose reason contains ``fragment``."""
        wait_for(
            lambda: fragment in self.record().last_error, timeout, what=f"{self.id} to refuse: {fragment}"
        )
        error = str(self.record().last_error)
        assert error.startswith("desired state refused:"), error
        return error

    def trusted_fleet_keys(self) -> list[str]:
        return sorted(json.loads((self.data_dir / FLEET_KEYS_FILE).read_text())["keys"])


@pytest.fixture
def device(
    rig: Rig, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Device]:
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "cfg"))
    dev = Device(rig, request.node.name.removeprefix("test_")[:40].replace("_", "-"), tmp_path / "agent")
    try:
        yield dev
    finally:
        dev.stop()


def forged(
    device_id: str,
    key: SigningKey,
    counter: int,
    models: list[OrderedModel],
    *,
    epoch: int = 2**40,
    claim_key_id: str = "",
    expires_in: float = 3600.0,
) -> mpb.DesiredState:
    """A desired state signed by ``key`` (optionally claiming another key's id), as an attacker makes it."""
    now = time.time()
    order = Order(device_id, epoch, counter, now, now + expires_in, "forged", tuple(models))
    state = mpb.DesiredState(device_id=device_id, generation=counter, rollout_id="forged")
    state.signed.CopyFrom(sign(order.to_bytes(), key))
    if claim_key_id:
        state.signed.key_id = claim_key_id
    for m in models:
        state.models.add(name=m.name, digest=m.digest, version=m.version, rollback=m.rollback)
    return state


def test_enrollment_hands_over_the_fleet_key_apart_from_the_artifact_keys(rig: Rig, device: Device) -> None:
    creds = json.loads((device.data_dir / "credentials.json").read_text())
    assert len(creds["fleetKeys"]) == 1 and creds["fleetKeys"] != creds["trustedKeys"]
    assert oct((device.data_dir / FLEET_KEYS_FILE).stat().st_mode & 0o777) == "0o600"
    assert (rig.fleet.layout.directory / FLEET_KEY_FILE).stat().st_mode & 0o077 == 0
    device.deploy(1)
    signed = device.retained_desired()
    assert signed.signed.key_id == rig.fleet_key_id
    order = Order.from_bytes(signed.signed.payload)
    assert order.device_id == device.id and order.counter == signed.generation
    assert order.models == (OrderedModel(NAME, rig.digests[1], 1, False),)
    assert 0 < order.expires_at - time.time() <= TTL


def test_a_forged_rollback_is_refused_and_the_signed_one_is_followed(rig: Rig, device: Device) -> None:
    """Row 2: whoever publishes desired state cannot downgrade a device; the control plane can."""
    device.deploy(1)
    second = device.deploy(2)
    current = device.retained_desired()
    old = rig.digests[1]

    # The old attack: an unsigned state with the rollback flag set.
    downgrade = mpb.DesiredState(device_id=device.id, generation=current.generation + 1,
                                 models=[mpb.DesiredModel(name=NAME, digest=old, version=1, rollback=True)])  # fmt: skip
    device.publish(downgrade)
    device.refused(f"generation {current.generation + 1} is unsigned")
    # A genuine signature with the readable fields rewritten: the agent acts on what was signed.
    tampered = mpb.DesiredState()
    tampered.CopyFrom(current)
    del tampered.models[:]
    tampered.models.add(name=NAME, digest=old, version=1, rollback=True)
    tampered.generation = current.generation + 50
    device.publish(tampered)
    device.publish(mpb.DesiredState(device_id=device.id, generation=777))  # processed after `tampered`
    device.refused("generation 777 is unsigned")
    assert device.serves(2) and device.record().observed_generation == current.generation
    # Signed by a key of the attacker's, claiming the fleet key's id.
    rollback = [OrderedModel(NAME, old, 1, rollback=True)]
    device.publish(forged(device.id, SigningKey.generate(), 2**40, rollback, claim_key_id=rig.fleet_key_id))
    device.refused(f"signature by fleet key {rig.fleet_key_id} does not verify")
    time.sleep(1.0)
    assert device.serves(2)

    # Positive control: the operator's rollback is signed, names version 1, and is followed.
    fleet = rig.fleet
    with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
        deployer.rollouts.Rollback(RP.RolloutActionRequest(id=second))
    wait_for(lambda: device.serves(1), 30, what="the signed rollback to version 1")
    order = Order.from_bytes(device.retained_desired().signed.payload)
    assert order.models == (OrderedModel(NAME, old, 1, rollback=True),)
    wait_for(lambda: not device.record().last_error, 15, what="the refusal to clear once a signed order came")


def test_a_freeze_by_a_huge_counter_fails_and_reenrollment_keeps_counting(
    rig: Rig, device: Device, tmp_path: Path
) -> None:
    """Row 3: a bogus high generation cannot freeze the agent; nor can decommission + re-enroll."""
    device.deploy(1)
    huge = 2**62
    device.publish(mpb.DesiredState(device_id=device.id, generation=huge,
                                    models=[mpb.DesiredModel(name=NAME, digest=rig.digests[1], version=1)]))  # fmt: skip
    device.refused(f"generation {huge} is unsigned")
    attacker_key = SigningKey.generate()
    device.publish(forged(device.id, attacker_key, huge, [OrderedModel(NAME, rig.digests[1], 1)]))
    device.refused(f"signed by fleet key {attacker_key.key_id}, which this device does not trust")
    device.deploy(2)  # it still follows the control plane
    before = json.loads((device.data_dir / "state.json").read_text())["observed_generation"]

    fleet = rig.fleet
    with fleet.client(fleet.token(Role.ADMIN, "admin")) as admin:
        admin.fleet.DecommissionDevice(fleet_pb2.DecommissionDeviceRequest(id=device.id))
    device.stop()
    (device.data_dir / "credentials.json").unlink()  # the operator re-enrolls it; state.json stays
    device.start()
    rollout = device.deploy(3)
    with fleet.cp.store.tx() as tx:
        first = tx.scalar("SELECT generation FROM rollout_devices WHERE rollout_id = ? AND device_id = ?",
                          (rollout, device.id))  # fmt: skip
    assert int(first) > before  # the re-enrolled device's first order continues the count


def test_a_replayed_or_expired_order_is_refused_and_the_control_plane_keeps_orders_fresh(
    rig: Rig, device: Device
) -> None:
    """Row 15 / TUF's freeze: an old signed order is refused once newer, and for good once expired."""
    device.deploy(1)
    old = device.retained_desired()
    old_order = Order.from_bytes(old.signed.payload)
    device.deploy(2)
    device.publish(old)
    device.refused(f"replayed desired state: counter {old_order.counter} is older than")
    assert device.serves(2)

    # Positive control: with no rollout at all, the controller re-signs before expiry, so the
    # agent always holds a valid order and the refusal above clears.
    seen = device.record().observed_generation
    wait_for(lambda: device.record().observed_generation > seen and not device.record().last_error, TTL * 2,
             what="a re-signed order to arrive by itself")  # fmt: skip
    wait_for(lambda: time.time() > old_order.expires_at + 0.5, TTL * 2, what="the old order to expire")
    device.publish(old)
    device.refused(f"signed desired state counter {old_order.counter} expired")

    # A fresh agent (wiped data dir: no memory of later counters) still refuses the expired order.
    device.stop()
    shutil.rmtree(device.data_dir)
    device.start()
    device.publish(old)
    device.refused("expired")
    device.deploy(3)


def test_key_rotation_is_followed_when_signed_by_the_current_key_only(
    rig: Rig, device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 15: trust moves to a new fleet key by a statement the old key signed, and by nothing else."""
    device.deploy(1)
    old_kid = rig.fleet_key_id
    assert device.trusted_fleet_keys() and len(device.trusted_fleet_keys()) == 1
    stolen = SigningKey.load(rig.fleet.layout.directory / FLEET_KEY_FILE)  # kept to attack after rotation
    evil = SigningKey.generate()
    models = [OrderedModel(NAME, rig.digests[1], 1)]

    def rotation_to(new: SigningKey, signer: SigningKey, claim: str = "") -> mpb.SignedPayload:
        statement = sign(KeyRotation(old_kid, new.public_key, time.time()).to_bytes(), signer)
        if claim:
            statement.key_id = claim
        return statement

    # A rotation signed by a stranger is ignored, so the order its new key signs is not trusted.
    state = forged(device.id, evil, 2**40, models)
    state.key_rotations.append(rotation_to(evil, evil))
    device.publish(state)
    device.refused(f"signed by fleet key {evil.key_id}, which this device does not trust")
    # A stranger's rotation claiming to come from the fleet key does not verify.
    state = forged(device.id, evil, 2**40, models)
    state.key_rotations.append(rotation_to(evil, evil, claim=old_kid))
    device.publish(state)
    device.refused(f"fleet key rotation: the signature by fleet key {old_kid} does not verify")
    assert [old_kid] == _kids(device)

    # Positive control: the operator rotates; the running control plane re-signs with the new key.
    from tests.control_plane.test_cp_cli import APP

    monkeypatch.delenv("EDGECTL_TOKEN", raising=False)
    result = CliRunner().invoke(APP, ["control-plane", "rotate-fleet-key", "--security-dir",
                                      str(rig.fleet.layout.directory), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rotated = json.loads(result.stdout)
    assert rotated["previous_key_id"] == old_kid and rotated["key_id"] != old_kid
    wait_for(
        lambda: _kids(device) == [rotated["key_id"]], TTL * 2, what="the agent to trust the new key only"
    )
    device.deploy(2)
    assert device.retained_desired().signed.key_id == rotated["key_id"]

    # The retired key is worthless now: its orders are refused, and so is a rotation it signs.
    device.publish(forged(device.id, stolen, 2**40, models))
    device.refused(f"signed by fleet key {old_kid}, which this device does not trust")
    state = forged(device.id, evil, 2**40, models)
    state.key_rotations.append(rotation_to(evil, stolen))
    device.publish(state)
    device.refused(f"signed by fleet key {evil.key_id}, which this device does not trust")
    assert _kids(device) == [rotated["key_id"]]
    device.deploy(3)


def _kids(device: Device) -> list[str]:
    from edgectl.artifact.signing import key_id, load_public_key

    return sorted(key_id(load_public_key(p.encode(), "fleet-keys.json")) for p in device.trusted_fleet_keys())


def test_withheld_orders_show_as_expired_while_the_device_keeps_serving(rig: Rig, device: Device) -> None:
    """TUF's freeze, detected: when fresh orders stop coming (a broker that withholds them, or a
    control plane that is down), the agent says its order expired and keeps serving."""
    device.deploy(1)
    loop = rig.fleet.cp.loop
    loop.stop()  # nothing re-signs or republishes from now on: the freeze
    try:
        wait_for(lambda: "signed desired state expired" in device.record().last_error, TTL * 2,
                 what="the agent to report its order expired")  # fmt: skip
        assert device.serves(1)
        assert device.agent is not None and device.agent.registry.get(NAME) is not None
    finally:
        loop.start()
    # Positive control: once the control plane re-signs, the report is clean again.
    wait_for(lambda: not device.record().last_error, TTL * 2, what="a fresh order to clear the report")
