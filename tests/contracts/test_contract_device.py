"""A device as the control plane relies on it, checked against the simulated device and a real agent.

Control-plane tests drive ``tests/control_plane/sim_device.py`` (devices that speak the MQTT
contract without fetching or running anything). Every test here runs twice: against a
``SimDevice`` and against a real :class:`~edgectl.agent.agent.Agent` that fetches, verifies and
serves, both driven by a real control plane over a real mosquitto, and observed on the wire. So
the simulation cannot pass a control-plane test with behaviour no real device has.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from edgectl.agent.agent import Agent
from edgectl.artifact import Artifact, SigningKey, TrustStore, public_pem
from edgectl.broker import MosquittoProcess
from edgectl.client import push_artifact
from edgectl.mqtt.wire import DeviceTopics
from edgectl.protos.v1 import common_pb2, fleet_pb2, mqtt_pb2, rollouts_pb2
from tests.agent.conftest import agent_config, wait_for
from tests.agent.onnx_models import mlp_artifact
from tests.contracts.conftest import RealControlPlane
from tests.control_plane.sim_device import SimFleet
from tests.harness.mqtt import MqttTestClient, drain_decoded

RP = rollouts_pb2
DEVICE = "dut-1"
LABELS = {"site": "contract"}
SELECTOR = common_pb2.Selector(match_labels=LABELS)


class DeviceUnderTest(Protocol):
    """Either device, as a test drives it."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """A clean shutdown."""

    def drop(self) -> None:
        """The connection dies without a goodbye (power cut, cable pulled)."""

    def close(self) -> None: ...


class SimDeviceUnderTest:
    """One SimDevice, told which digests fail (a real agent finds out by running them)."""

    def __init__(self, broker: MosquittoProcess, bad: set[str]) -> None:
        self.fleet = SimFleet(broker.host, broker.port)
        self.fleet.add(DEVICE, dict(LABELS), bad_digests=bad)

    def start(self) -> None:
        self.fleet.connect([DEVICE])

    def stop(self) -> None:
        self.fleet.disconnect(DEVICE, graceful=True)

    def drop(self) -> None:
        self.fleet.disconnect(DEVICE, graceful=False)

    def close(self) -> None:
        self.fleet.close()


class AgentUnderTest:
    """A real agent: fetches from the control plane, verifies, smoke-tests, serves."""

    def __init__(self, tmp: Path, broker: MosquittoProcess, cp_address: str, trust_file: Path) -> None:
        config = agent_config(
            tmp, trust_file, device_id=DEVICE, mqtt=broker.url, control_plane=cp_address, labels=dict(LABELS)
        )
        self.agent = Agent(config)
        self.stopped = False

    def start(self) -> None:
        self.agent.start()

    def stop(self) -> None:
        self.stopped = True
        self.agent.stop()

    def drop(self) -> None:
        sock = self.agent.link.client.socket()
        assert sock is not None, "the agent is not connected"
        sock.shutdown(socket.SHUT_RDWR)  # the broker sees the TCP connection end, no DISCONNECT

    def close(self) -> None:
        if not self.stopped:
            self.agent.stop()


@dataclass
class Wire:
    """What the device and the control plane said on the device's topics, in order."""

    client: MqttTestClient
    topics: DeviceTopics
    reported: list[mqtt_pb2.ReportedState] = field(default_factory=list)
    status: list[mqtt_pb2.DeviceStatus] = field(default_factory=list)
    desired: list[mqtt_pb2.DesiredState] = field(default_factory=list)

    def drain(self) -> None:
        t = self.topics
        drain_decoded(self.client, {t.reported: (mqtt_pb2.ReportedState, self.reported),
                                    t.status: (mqtt_pb2.DeviceStatus, self.status),
                                    t.desired: (mqtt_pb2.DesiredState, self.desired)})  # fmt: skip

    def model(self, name: str = "mlp") -> mqtt_pb2.ActiveModel | None:
        self.drain()
        for model in self.reported[-1].models if self.reported else []:
            if model.name == name:
                return model
        return None


@dataclass
class Setup:
    cp: RealControlPlane
    device: DeviceUnderTest
    wire: Wire
    v1: str
    v2: str
    bad: str

    def rollout(self, artifact: str) -> rollouts_pb2.Rollout:
        """Roll ``artifact`` out to the device and wait for the rollout to end."""
        request = RP.CreateRolloutRequest(
            artifact=artifact,
            selector=SELECTOR,
            strategy=RP.Strategy(waves=["100%"], max_failures="0", health_timeout_seconds=60),
        )
        rollout = self.cp.client.rollouts.Create(request, timeout=10)
        return self.wait_done(rollout.id)

    def wait_done(self, rollout_id: str) -> rollouts_pb2.Rollout:
        for _ in self.cp.client.rollouts.Watch(RP.WatchRolloutRequest(id=rollout_id), timeout=90):
            pass  # the stream ends when the rollout does
        return self.cp.client.rollouts.Get(RP.GetRolloutRequest(id=rollout_id), timeout=10)

    def seen(self) -> fleet_pb2.Device:
        return self.cp.client.fleet.GetDevice(fleet_pb2.GetDeviceRequest(id=DEVICE), timeout=10)


@pytest.fixture
def trust_file(tmp_path: Path, signing_key: SigningKey) -> Path:
    path = tmp_path / "trusted.pub.pem"
    path.write_bytes(public_pem(signing_key.public_key))
    return path


@pytest.fixture(params=["sim", "agent"])
def setup(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    trust: TrustStore,
    trust_file: Path,
    signing_key: SigningKey,
) -> Iterator[Setup]:
    cp = RealControlPlane(tmp_path / "cp", mosquitto, trust)

    def build(out: str, **kw: Any) -> Artifact:
        return mlp_artifact(tmp_path / out, tmp_path / "models", signing_key, **kw)

    v1 = push_artifact(cp.client, build("v1", version=1, seeds=(1, 2)).root).artifact.ref.digest
    v2 = push_artifact(cp.client, build("v2", version=2, seeds=(3, 4)).root).artifact.ref.digest
    # Signed and well formed, but its golden outputs are wrong: a real agent's smoke test fails.
    wrong = build("bad", version=3, seeds=(5, 6), golden_outputs={"y": np.full((2, 3), 1e6, np.float32)})
    bad = push_artifact(cp.client, wrong.root).artifact.ref.digest
    observer = MqttTestClient(mosquitto.host, mosquitto.port)
    observer.connect()
    observer.subscribe(DeviceTopics(DEVICE).subtree)
    device: DeviceUnderTest = (
        SimDeviceUnderTest(mosquitto, {bad})
        if request.param == "sim"
        else AgentUnderTest(tmp_path / "device", mosquitto, cp.address, trust_file)
    )
    made = Setup(cp, device, Wire(observer, DeviceTopics(DEVICE)), v1, v2, bad)
    try:
        device.start()
        # Online with its labels: a status message can make the device known (and online) before the
        # report carrying its labels is ingested, and a rollout by label then matched no device.
        wait_for(lambda: _online(made), 30, what="the control plane to see the device online with its labels")
        yield made
    finally:
        device.close()
        observer.close()
        cp.close()


def _online(s: Setup) -> bool:
    try:
        device = s.seen()
    except Exception:  # NOT_FOUND until the first report is ingested
        return False
    return device.online and dict(device.labels).items() >= LABELS.items()


def test_a_connected_device_is_online_with_its_labels(setup: Setup) -> None:
    device = setup.seen()
    assert device.online and dict(device.labels).items() >= LABELS.items()
    setup.wire.drain()
    assert setup.wire.status and setup.wire.status[-1].online
    assert setup.wire.reported and setup.wire.reported[-1].device_id == DEVICE


def test_a_rollout_converges_and_the_device_reports_what_it_runs(setup: Setup) -> None:
    first = setup.rollout(setup.v1)
    assert first.state == RP.ROLLOUT_STATE_SUCCEEDED, first.reason
    second = setup.rollout(setup.v2)
    assert second.state == RP.ROLLOUT_STATE_SUCCEEDED, second.reason
    assert setup.seen().active.digest == setup.v2
    model = wait_for(lambda: _model_is(setup, setup.v2), 10, what="the report of v2")
    assert model.version == 2 and model.smoke_test_passed and model.previous_digest == setup.v1
    assert not model.failed_digest
    # The report acknowledges the desired state it answers.
    assert setup.wire.reported[-1].observed_generation == setup.wire.desired[-1].generation


def test_a_version_that_fails_on_the_device_is_reported_and_the_old_one_kept(setup: Setup) -> None:
    assert setup.rollout(setup.v1).state == RP.ROLLOUT_STATE_SUCCEEDED
    failed = setup.rollout(setup.bad)
    assert failed.state in (RP.ROLLOUT_STATE_FAILED, RP.ROLLOUT_STATE_ROLLED_BACK), failed.reason
    # The answer to the desired state naming the bad version: still v1, the failure and why.
    setup.wire.drain()
    ordered_bad = next(d.generation for d in setup.wire.desired if d.models[0].digest == setup.bad)

    def answer() -> mqtt_pb2.ActiveModel | None:
        setup.wire.drain()
        for report in setup.wire.reported:
            if report.observed_generation == ordered_bad:
                return report.models[0]
        return None

    model = wait_for(answer, 10, what="the device's answer to the bad version")
    assert (model.digest, model.failed_digest) == (setup.v1, setup.bad)
    assert model.failure_reason  # a reason an operator can read
    assert setup.seen().active.digest == setup.v1
    # The control plane then orders v1 back; the device, already on it, reports no failure any more.
    wait_for(lambda: _model_is(setup, setup.v1), 10, what="a clean report once v1 is desired again")


def test_a_rollback_returns_the_device_to_the_previous_version(setup: Setup) -> None:
    assert setup.rollout(setup.v1).state == RP.ROLLOUT_STATE_SUCCEEDED
    upgrade = setup.rollout(setup.v2)
    assert upgrade.state == RP.ROLLOUT_STATE_SUCCEEDED
    setup.cp.client.rollouts.Rollback(RP.RolloutActionRequest(id=upgrade.id), timeout=10)
    back = setup.wait_done(upgrade.id)
    assert back.state == RP.ROLLOUT_STATE_ROLLED_BACK, back.reason
    model = wait_for(lambda: _model_is(setup, setup.v1), 20, what="the report of v1 again")
    assert model.version == 1 and model.smoke_test_passed
    assert setup.wire.desired[-1].models[0].rollback  # the downgrade was asked for as a rollback


def test_rolling_back_a_first_install_stops_serving_the_model(setup: Setup) -> None:
    """The way back from a device's first version is no version: the exclusive desired state no
    longer names the model, the device stops serving it, and the rollback is confirmed."""
    first = setup.rollout(setup.v1)
    assert first.state == RP.ROLLOUT_STATE_SUCCEEDED
    setup.cp.client.rollouts.Rollback(RP.RolloutActionRequest(id=first.id), timeout=10)
    back = setup.wait_done(first.id)
    assert back.state == RP.ROLLOUT_STATE_ROLLED_BACK and "did not confirm" not in back.reason, back.reason
    setup.wire.drain()
    assert setup.wire.desired[-1].exclusive and not setup.wire.desired[-1].models
    wait_for(lambda: setup.wire.model() is None, 20, what="a report without the model")


def test_a_closed_maintenance_window_stages_and_keeps_the_running_version(setup: Setup) -> None:
    assert setup.rollout(setup.v1).state == RP.ROLLOUT_STATE_SUCCEEDED
    # A window on a weekday three days from today (UTC): closed now, whatever the hour.
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[(datetime.now(timezone.utc).weekday() + 3) % 7]
    request = RP.CreateRolloutRequest(
        artifact=setup.v2, selector=SELECTOR,
        strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=60, window=f"{day} 01:00-02:00 UTC"),
    )  # fmt: skip
    setup.cp.client.rollouts.Create(request, timeout=10)
    model = wait_for(lambda: _staged(setup, setup.v2), 30, what="v2 reported staged")
    assert model.digest == setup.v1 and model.smoke_test_passed  # still serving v1
    assert setup.seen().active.digest == setup.v1


def _staged(s: Setup, digest: str) -> mqtt_pb2.ActiveModel | None:
    model = s.wire.model()
    return model if model is not None and model.staged_digest == digest else None


def test_a_device_that_stops_cleanly_is_seen_offline(setup: Setup) -> None:
    setup.device.stop()
    wait_for(lambda: not setup.seen().online, 15, what="the control plane to see the device offline")
    setup.wire.drain()
    assert setup.wire.status[-1].online is False


def test_a_lost_connection_is_published_offline_by_the_will(setup: Setup) -> None:
    setup.wire.drain()
    before = len(setup.wire.status)
    setup.device.drop()

    def went_offline() -> bool:
        setup.wire.drain()
        return any(not s.online for s in setup.wire.status[before:])

    wait_for(went_offline, 15, what="the broker to publish the device's Last Will")


def _model_is(setup: Setup, digest: str, failed: str = "") -> mqtt_pb2.ActiveModel | None:
    model = setup.wire.model()
    if model is not None and model.digest == digest and model.failed_digest == failed:
        return model
    return None
