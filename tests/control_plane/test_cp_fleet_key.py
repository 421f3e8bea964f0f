"""The fleet key in a security dir: made once, 0600, shared by replicas, rotated crash-safely."""

from __future__ import annotations

import stat
from pathlib import Path

from edgectl.artifact import SigningKey, TrustStore, public_pem
from edgectl.control_plane.fleet_key import (
    FLEET_KEY_FILE,
    NEXT_KEY_FILE,
    ROTATIONS_FILE,
    FleetKeyring,
    _write_rotations,
)
from edgectl.mqtt.orders import KeyRotation, apply_rotations, sign


def test_made_on_first_use_private_and_shared_by_every_replica(tmp_path: Path) -> None:
    first, second = FleetKeyring.load_or_create(tmp_path), FleetKeyring.load_or_create(tmp_path)
    assert first.current().key_id == second.current().key_id
    assert stat.S_IMODE((tmp_path / FLEET_KEY_FILE).stat().st_mode) == 0o600
    assert first.rotations() == [] and len(first.public_pems()) == 1


def test_a_rotation_is_seen_by_a_running_replica_and_followed_by_agents(tmp_path: Path) -> None:
    running, operator = FleetKeyring.load_or_create(tmp_path), FleetKeyring.load_or_create(tmp_path)
    old = running.current()
    rotation = operator.rotate()
    assert rotation.previous_key_id == old.key_id
    assert running.current().key_id == rotation.new_key_id  # picked up without a restart
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    agent_trust, _ = apply_rotations(running.rotations(), TrustStore([old.public_key]))
    assert agent_trust.key_ids() == [rotation.new_key_id]
    second = operator.rotate()
    agent_trust, _ = apply_rotations(running.rotations(), TrustStore([old.public_key]))
    assert agent_trust.key_ids() == [second.new_key_id]  # an agent that missed both follows the chain


def test_a_replica_signing_while_the_operator_rotates_never_loses_the_next_key(tmp_path: Path) -> None:
    """The race that bricked a fleet: a replica reloading between the next key's write and its
    statement took it for a crashed rotation and deleted it, so agents moved to a key nobody had."""
    import threading

    running, operator = FleetKeyring.load_or_create(tmp_path), FleetKeyring.load_or_create(tmp_path)
    first = running.current()
    stop = threading.Event()
    failures: list[BaseException] = []

    def sign_all_the_time() -> None:
        while not stop.is_set():
            try:
                running.current()
                running.rotations()
            except Exception as exc:  # a replica that cannot sign is a failure too
                failures.append(exc)
                return

    reader = threading.Thread(target=sign_all_the_time)
    reader.start()
    try:
        rotations = [operator.rotate() for _ in range(25)]
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert running.current().key_id == rotations[-1].new_key_id
    agent_trust, _ = apply_rotations(running.rotations(), TrustStore([first.public_key]))
    assert agent_trust.key_ids() == [rotations[-1].new_key_id]


def test_a_rotation_that_crashed_is_finished_or_forgotten(tmp_path: Path) -> None:
    ring = FleetKeyring.load_or_create(tmp_path)
    old = ring.current().key_id
    # Crashed before its statement was written (or still writing it): the next key is not
    # current and not announced; the next rotation starts over from the current key.
    stray = SigningKey.generate()
    stray.save(tmp_path / NEXT_KEY_FILE)
    reloaded = FleetKeyring.load_or_create(tmp_path)
    assert reloaded.current().key_id == old and reloaded.rotations() == []
    restarted = reloaded.rotate()
    assert restarted.previous_key_id == old and restarted.new_key_id != stray.key_id
    assert not (tmp_path / NEXT_KEY_FILE).exists()
    # Crashed after the statement, before the key became current: the next load finishes it,
    # and until then no replica hands out the statement for a key that does not sign yet.
    nxt = SigningKey.generate()
    statement = sign(KeyRotation(ring.current().key_id, nxt.public_key, 0).to_bytes(), ring.current())
    chain = [*ring.rotations(), statement]
    _write_rotations(tmp_path / ROTATIONS_FILE, chain)
    assert len(FleetKeyring(tmp_path).rotations()) == len(chain) - 1  # announced, not yet current
    nxt.save(tmp_path / NEXT_KEY_FILE)
    finished = FleetKeyring.load_or_create(tmp_path)
    assert finished.current().key_id == nxt.key_id and len(finished.rotations()) == len(chain)
    assert (tmp_path / "fleet-key.pub.pem").read_bytes() == public_pem(nxt.public_key)
    assert not (tmp_path / NEXT_KEY_FILE).exists()


def test_the_commands_refuse_what_cannot_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgectl.errors import EdgectlError
    from tests.control_plane.test_cp_cli import APP

    runner = CliRunner()
    missing = runner.invoke(APP, ["control-plane", "rotate-fleet-key", "--security-dir", str(tmp_path)])
    assert isinstance(missing.exception, EdgectlError) and missing.exception.exit_code != 0
    assert "start the control plane once" in str(missing.exception.hint)
    assert not (tmp_path / FLEET_KEY_FILE).exists()  # refusing made no key
    short = runner.invoke(APP, ["control-plane", "serve", "--insecure", "--order-ttl", "1s"])
    assert isinstance(short.exception, EdgectlError) and "--order-ttl 1s is too short" in str(short.exception)
    FleetKeyring.load_or_create(tmp_path)
    rotated = runner.invoke(APP, ["control-plane", "rotate-fleet-key", "--security-dir", str(tmp_path)])
    assert rotated.exit_code == 0 and "->" in rotated.stdout


def test_signed_orders_count_on_across_decommission_and_restarts_in_one_epoch(
    state_url: str, tmp_path: Path
) -> None:
    """Row 3 at the store, on SQLite and PostgreSQL: a forgotten device's counter is never reused,
    and the epoch is fixed once, for every replica and restart of the store."""
    from edgectl.control_plane.desired import OrderSigner, orders_to_refresh, write_desired
    from edgectl.control_plane.fleet import Fleet
    from edgectl.control_plane.store import StateStore
    from edgectl.mqtt.orders import Order, verify
    from edgectl.mqtt.wire import decode
    from edgectl.protos.v1 import mqtt_pb2

    ring = FleetKeyring.load_or_create(tmp_path / "security")
    signer = OrderSigner(ring, ttl_s=100.0)
    trust = TrustStore([ring.current().public_key])
    model = mqtt_pb2.DesiredModel(name="m", digest="sha256:" + "ab" * 32, version=1)

    def order(store: StateStore, now: float) -> Order:
        with store.tx() as tx:
            Fleet._ensure_device(tx, "cam-1", now)
            payload = write_desired(tx, "cam-1", [model], "r-1", now, signer).payload
        return Order.from_bytes(verify(decode(payload, mqtt_pb2.DesiredState).signed, trust))

    store = StateStore(state_url)
    first, second = order(store, 1000.0), order(store, 1001.0)
    assert (first.epoch, first.counter, second.counter) == (1000, 1, 2) and second.expires_at == 1101.0
    Fleet(store).decommission("cam-1")
    store.close()
    replica = StateStore(state_url)  # a restart, or another replica of the same store
    again = order(replica, 5000.0)
    assert (again.epoch, again.counter) == (1000, 3)
    with replica.tx() as tx:
        assert orders_to_refresh(tx, signer, 5000.0) == []  # fresh: nothing to re-sign
        assert [d for d, _ in orders_to_refresh(tx, signer, 5051.0)] == ["cam-1"]  # past half its life
    ring.rotate()
    with replica.tx() as tx:
        assert [d for d, _ in orders_to_refresh(tx, signer, 5000.0)] == ["cam-1"]  # signed by a retired key
    replica.close()
