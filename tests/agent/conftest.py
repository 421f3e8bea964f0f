"""Agent fixtures: signing keys, a real artifact server, a real broker, and agents to drive.

Desired state is published retained on the real broker exactly as the control plane would;
reported state and events are read back from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from edgectl.agent.agent import Agent
from edgectl.agent.codecs import decode_response, encode_request, response_parameters
from edgectl.agent.config import AgentConfig
from edgectl.agent.serving import ModelRegistry
from edgectl.artifact import Artifact, SigningKey, public_pem
from edgectl.broker import MosquittoProcess
from edgectl.mqtt.wire import DeviceTopics, encode
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.artifact_server import ArtifactStoreServer
from tests.agent.onnx_models import mlp_artifact, run_direct
from tests.harness.mqtt import MqttTestClient, drain_decoded

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "edgectl-config"))


@pytest.fixture
def trust_file(tmp_path: Path, signing_key: SigningKey) -> Path:
    path = tmp_path / "trusted.pub.pem"
    path.write_bytes(public_pem(signing_key.public_key))
    return path


@pytest.fixture
def artifact_server(tmp_path: Path) -> Iterator[ArtifactStoreServer]:
    server = ArtifactStoreServer(tmp_path / "cp").start()
    try:
        yield server
    finally:
        server.stop()


class Bundles:
    """Builds signed MLP artifacts in tmp_path."""

    def __init__(self, tmp: Path, key: SigningKey) -> None:
        self.tmp, self.key, self.n = tmp, key, 0

    def build(self, **kw: Any) -> Artifact:
        self.n += 1
        kw.setdefault("key", self.key)
        key = kw.pop("key")
        return mlp_artifact(self.tmp / "bundles" / f"b{self.n}", self.tmp / "models", key, **kw)


@pytest.fixture
def bundles(tmp_path: Path, signing_key: SigningKey) -> Bundles:
    return Bundles(tmp_path, signing_key)


class Fleet:
    """The control plane's view of one device over a real broker: publish desired, read reported."""

    def __init__(self, broker: MosquittoProcess, device_id: str) -> None:
        self.topics = DeviceTopics(device_id)
        self.device_id = device_id
        self.generation = 0
        self.client = MqttTestClient(broker.host, broker.port)
        self.client.connect()
        self.client.subscribe(self.topics.subtree)
        self.reported: list[mpb.ReportedState] = []
        self.events: list[mpb.DeviceEvent] = []
        self.status: list[mpb.DeviceStatus] = []

    def desire(self, *models: mpb.DesiredModel, generation: int | None = None) -> None:
        self.generation = generation if generation is not None else self.generation + 1
        ds = mpb.DesiredState(device_id=self.device_id, generation=self.generation, models=list(models))
        self.client.publish(self.topics.desired, encode(ds), retain=True)

    def drain(self) -> None:
        t = self.topics
        drain_decoded(self.client, {t.reported: (mpb.ReportedState, self.reported),
                                    t.events: (mpb.DeviceEvent, self.events),
                                    t.status: (mpb.DeviceStatus, self.status)})  # fmt: skip

    def latest(self) -> mpb.ReportedState | None:
        self.drain()
        return self.reported[-1] if self.reported else None

    def wait_model(
        self, name: str, check: Callable[[mpb.ActiveModel], bool], timeout: float = 20.0
    ) -> mpb.ActiveModel:
        def found() -> mpb.ActiveModel | None:
            rs = self.latest()
            for m in rs.models if rs else []:
                if m.name == name and check(m):
                    return m
            return None

        return wait_for(found, timeout, f"reported model {name} to match")

    def wait_serving(self, name: str, digest: str, timeout: float = 20.0) -> mpb.ActiveModel:
        return self.wait_model(name, lambda m: m.digest == digest and m.smoke_test_passed, timeout)

    def event_kinds(self, digest: str) -> list[int]:
        self.drain()
        return [e.kind for e in self.events if e.digest == digest]

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def fleet(mosquitto: MosquittoProcess) -> Iterator[Fleet]:
    f = Fleet(mosquitto, "dev-1")
    try:
        yield f
    finally:
        f.close()


class V2Client:
    """Our V2 stubs against one agent."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def infer(self, model: str, x: np.ndarray, timeout: float = 10.0) -> tuple[np.ndarray, str, str]:
        """(y, served_by, version)."""
        response = self.stub.ModelInfer(encode_request(model, {"x": x}), timeout=timeout)
        return (
            decode_response(response)["y"],
            str(response_parameters(response)["served_by"]),
            response.model_version,
        )

    def close(self) -> None:
        self.channel.close()


def agent_config(tmp_path: Path, trust_file: Path, **kw: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "device_id": "dev-1",
        "data_dir": tmp_path / "agent",
        "listen": "127.0.0.1:0",
        "trust": (trust_file,),
        "profile": "x86-cpu-avx2",
        "heartbeat_s": 1.0,
        "intra_op_threads": 1,
    }
    values.update(kw)
    return AgentConfig(**values).validate()


@pytest.fixture
def make_agent(tmp_path: Path, trust_file: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def _make(serve: bool = True, clock: Callable[[], float] | None = None, **kw: Any) -> Agent:
        extra: dict[str, Any] = {"clock": clock} if clock else {}
        agent = Agent(agent_config(tmp_path, trust_file, **kw), serve=serve, **extra)
        agent.start()
        agents.append(agent)
        return agent

    yield _make
    for a in agents:
        a.stop()


@dataclass(frozen=True)
class AgentRig:
    """One device's world: the real broker, the artifact server, the control plane's view of the
    device, signed bundles, and agents wired to that broker and server."""

    broker: MosquittoProcess
    server: ArtifactStoreServer
    fleet: Fleet
    bundles: Bundles
    make_agent: Callable[..., Agent]

    def agent(self, serve: bool = True, **kw: Any) -> Agent:
        """Start an agent on this broker and artifact server (``kw`` overrides either, or any setting)."""
        settings: dict[str, Any] = {"mqtt": self.broker.url, "control_plane": self.server.address, **kw}
        return self.make_agent(serve=serve, **settings)


@pytest.fixture
def rig(
    mosquitto: MosquittoProcess,
    artifact_server: ArtifactStoreServer,
    fleet: Fleet,
    bundles: Bundles,
    make_agent: Callable[..., Agent],
) -> AgentRig:
    return AgentRig(mosquitto, artifact_server, fleet, bundles, make_agent)


def infer_overlapping(registry: ModelRegistry, path: Path, requests: int = 64, callers: int = 16) -> None:
    """Send ``requests`` one-row calls to model ``m`` from ``callers`` threads, close ``registry``,
    and check every answer against onnxruntime run directly on ``path``."""
    xs = [np.random.default_rng(i).standard_normal((1, 32)).astype(np.float32) for i in range(requests)]
    # Callers that overlap: batches form only then (a lone caller never waits), so the threads
    # start each round together instead of as the pool happens to spawn them.
    together = threading.Barrier(callers)

    def call(x: np.ndarray) -> np.ndarray:
        together.wait(10)
        return registry.infer("m", {"x": x}, timeout=10)[0]["y"]

    with ThreadPoolExecutor(callers) as pool:
        outs = list(pool.map(call, xs))
    registry.close()
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_allclose(y, run_direct(path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
