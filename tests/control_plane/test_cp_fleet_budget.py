"""A fleet burst budget end to end: real mosquitto, a real control plane (its clock injected) and
three real agents whose every request bursts to a fourth (serve-only) agent, plus a simulated
older agent that reports cost but knows nothing of grants.

With a fleet budget of B requests per hour the three agents burst within 1 % of B in total (the
older agent's cost counted), then every one refuses with a clear V2 error; `edgectl burst` and the
metrics show the cost and each device's share; the next period (the control plane's clock moved
on) restores bursting."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from edgectl.agent.agent import Agent
from edgectl.artifact import SigningKey, public_pem
from edgectl.broker import MosquittoProcess
from edgectl.cli import app as APP
from edgectl.control_plane.server import ControlPlane
from edgectl.protos.v1 import mqtt_pb2
from tests.agent.conftest import V2Client, agent_config, wait_for
from tests.agent.onnx_models import mlp_artifact
from tests.control_plane.sim_device import SimFleet

B = 600  # requests per hour, the whole fleet
PRICE = 1.0  # per 1,000 requests
OLD_COST = 0.05  # what the older agent reported: 50 requests' worth
X = np.random.default_rng(5).standard_normal((1, 4)).astype(np.float32)


@pytest.fixture
def now() -> list[float]:
    return [1_000_000.0 + 120]  # two minutes into an hour-long period


@pytest.fixture
def plane(cp_factory: Callable[..., ControlPlane], now: list[float]) -> ControlPlane:
    cp = cp_factory(clock=lambda: now[0], fleet_burst_budget=B * PRICE / 1000, fleet_burst_period_s=3600)
    assert cp.election.leading.wait(10) and cp.bus.wait_connected(10)
    return cp


@pytest.fixture
def agents(
    tmp_path: Path, mosquitto: MosquittoProcess, plane: ControlPlane, signing_key: SigningKey, sim: SimFleet
) -> Iterator[list[Agent]]:
    trust_file = tmp_path / "trusted.pub.pem"
    trust_file.write_bytes(public_pem(signing_key.public_key))
    art = mlp_artifact(tmp_path / "art", tmp_path / "models", signing_key, dims=(4, 8, 5))
    old = sim.add("fb-old")  # an agent from before grants: its own cost only, no session
    old.stats = mqtt_pb2.ServingStats(burst_cost=OLD_COST, burst_budget=1.0)
    sim.connect(["fb-old"])
    wait_for(lambda: any(d.id == "fb-old" for d in plane.fleet.list_devices()), 10, what="the old agent")
    made: list[Agent] = []
    try:
        cloud = Agent(
            agent_config(tmp_path / "cloud", trust_file, serve_only=True, model_dir=art.root, device_id="")
        )
        cloud.start()
        made.append(cloud)
        for i in range(3):
            config = agent_config(
                tmp_path / f"fb-{i}", trust_file, device_id=f"fb-{i}", mqtt=mosquitto.url,
                control_plane=plane.address, burst=cloud.address, burst_price_per_1k=PRICE,
                burst_when_spent="refuse",
            )  # fmt: skip
            agent = Agent(config)  # serves no model: every request wants the burst endpoint
            agent.start()
            made.append(agent)
        yield made[1:]
    finally:
        for a in made:
            a.stop()


def _granted(agents: list[Agent], period: int) -> bool:
    return all(a.fleet_allowance.snapshot().period_start == period for a in agents)


class Traffic:
    """Two clients per agent, sending until stopped: how each request was answered, per agent."""

    def __init__(self, agents: list[Agent]) -> None:
        self.stop = threading.Event()
        self.seen: dict[str, Counter[str]] = {a.config.device_id: Counter() for a in agents}
        self.unexpected: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(a,), daemon=True) for a in agents for _ in range(2)
        ]
        for t in self.threads:
            t.start()

    def _run(self, agent: Agent) -> None:
        client = V2Client(agent.address)
        try:
            while not self.stop.is_set():
                try:
                    outcome = client.infer("mlp", X)[1]
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "fleet burst budget" not in str(
                        exc.details()
                    ):
                        self.unexpected.append(f"{exc.code()}: {exc.details()}")
                    outcome = "refused"
                with self.lock:
                    self.seen[agent.config.device_id][outcome] += 1
        finally:
            client.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_three_agents_stop_within_1_percent_of_the_fleet_budget_and_the_next_period_resumes(
    plane: ControlPlane,
    agents: list[Agent],
    now: list[float],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ledger = plane.grants.ledger
    assert ledger is not None
    wait_for(lambda: _granted(agents, ledger.period), 20, what="every agent's first grant")
    burst_label = f"burst:{agents[0].router.burst.target}"  # type: ignore[union-attr]
    traffic = Traffic(agents)
    try:
        per_request = round(PRICE / 1000 * 1e9)
        wait_for(
            lambda: (
                all(a.fleet_allowance.blocks(per_request) for a in agents)
                and ledger.committed() >= ledger._limit - 3 * per_request
            ),
            120,
            what="the fleet budget spent",
        )
        spent = Counter({d: c["refused"] for d, c in traffic.seen.items()})
        wait_for(lambda: all(traffic.seen[d]["refused"] >= spent[d] + 5 for d in spent), 30, what="refusals")
    finally:
        traffic.close()
    assert not traffic.unexpected, traffic.unexpected[:3]
    bursts = {d: c[burst_label] for d, c in traffic.seen.items()}
    fleet = sum(bursts.values()) + round(OLD_COST * 1000 / PRICE)
    print(
        f"fleet budget {B} requests: burst {bursts} + {OLD_COST * 1000 / PRICE:.0f} (older agent) = {fleet}"
    )
    assert B * 0.99 <= fleet <= B, bursts
    assert all(n > 0 for n in bursts.values())  # every agent had its share
    # All stop: every agent refuses now.
    for a in agents:
        client = V2Client(a.address)
        with pytest.raises(grpc.RpcError) as refused:
            client.infer("mlp", X)
        client.close()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fleet burst budget" in str(refused.value.details())

    # Shown: `edgectl burst` (each device's cost and share) and the metrics, from the reports.
    monkeypatch.setenv("EDGECTL_SERVER", plane.address)
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")

    def reported() -> dict[str, object] | None:
        result = CliRunner().invoke(APP, ["burst", "-o", "json"])
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)
        return status if status.get("spent", 0) >= 0.99 * B * PRICE / 1000 else None

    status = wait_for(reported, 20, what="the spending in the reports")
    assert status["budget"] == pytest.approx(B * PRICE / 1000) and status["spent"] <= B * PRICE / 1000 + 1e-9
    rows = {d["device_id"]: d for d in status["devices"]}  # type: ignore[union-attr]
    assert set(rows) == {"fb-0", "fb-1", "fb-2", "fb-old"} and "follows_grants" not in rows["fb-old"]
    assert sum(d.get("share", 0.0) for d in rows.values()) == pytest.approx(1.0)
    table = CliRunner().invoke(APP, ["burst"]).stdout
    assert "of the fleet budget 0.6" in table and "older agent" in table
    wide = CliRunner().invoke(APP, ["devices", "ls", "-o", "wide"]).stdout
    assert "burst cost" in wide and "%)" in wide
    metrics = generate_latest(plane.metrics.registry).decode()
    assert "edgectl_fleet_burst_budget_limit 0.6" in metrics and "edgectl_fleet_burst_budget_spent" in metrics
    assert "edgectl_agent_burst_grant_spent" in generate_latest(agents[0].metrics.registry).decode()

    # The next period (the control plane's clock): fresh grants, and every agent bursts again.
    now[0] += 3600
    wait_for(lambda: _granted(agents, ledger.period) and ledger.period > 1_000_000, 20, what="new grants")
    for a in agents:
        client = V2Client(a.address)
        assert client.infer("mlp", X)[1] == burst_label
        client.close()
