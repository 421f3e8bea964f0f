"""Burst under a budget, on real agents: a cloud agent as the V2 burst endpoint, an edge agent
whose local queue is too slow for its SLO (so every request wants to burst), real gRPC.

With a budget of B requests per hour, bursting stops at B exactly (concurrent callers cannot
overshoot: the price is reserved under a lock), then requests are refused RESOURCE_EXHAUSTED or
served locally as configured, and the next period (injected clock) bursts again. The cost and
what was held back are in the reported state over real mosquitto."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter

import grpc
import numpy as np
import pytest

from edgectl.agent.agent import Agent
from edgectl.agent.burst import BurstBudget
from edgectl.agent.config import AgentConfig
from edgectl.agent.errors import ConfigError
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.conftest import AgentRig, Bundles, V2Client, wait_for

B = 300  # requests per hour
X = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)


def _overload_with_clock(edge: Agent, now: list[float]) -> None:
    """An SLO of 1 us (every request wants to burst) and the budget on an injected clock."""
    edge.router.settings = dataclasses.replace(edge.router.settings, slo_s=1e-6)
    burst = edge.router.burst
    assert burst is not None
    burst.budget = BurstBudget(burst.budget.cost, clock=lambda: now[0])


def _fire(address: str, total: int, threads: int = 6) -> Counter[str]:
    """``total`` requests from ``threads`` concurrent clients: how each was answered."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    left = [total]

    def worker() -> None:
        client = V2Client(address)
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            try:
                outcome = client.infer("mlp", X)[1]
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "burst budget" in exc.details() and "resets in" in exc.details()
                outcome = "refused"
            with lock:
                seen[outcome] += 1
        client.close()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return seen


def test_bursting_stops_at_the_budget_then_refuses_until_the_next_period(
    bundles: Bundles, make_agent
) -> None:  # type: ignore[no-untyped-def]
    art = bundles.build(version=1)
    cloud: Agent = make_agent(serve_only=True, model_dir=art.root, device_id="")
    edge: Agent = make_agent(
        serve_only=True, model_dir=art.root, device_id="", burst=cloud.address,
        burst_price_per_1k=2.5, burst_budget=B * 2.5 / 1000, burst_when_spent="refuse",
    )  # fmt: skip
    now = [997_300.0]  # 100 s into an hour-long period (periods start at multiples of 3600 s)
    _overload_with_clock(edge, now)
    burst_label = f"burst:{cloud.address}"
    seen = _fire(edge.address, B + 40)
    assert abs(seen[burst_label] - B) <= B // 100, seen  # within 1 % of B (in fact exact)
    # What was not burst was refused, except the agent's own idle probes of the local model.
    assert seen[burst_label] == B and seen["refused"] + seen["local"] == 40 and seen["refused"] > 0
    snap = edge.router.burst.budget.snapshot()  # type: ignore[union-attr]
    assert snap.requests == B and snap.cost == pytest.approx(B * 2.5 / 1000)
    assert snap.held_back == seen["refused"]
    # Still inside the period: nothing bursts. The next period: bursting resumes, from zero.
    now[0] += 3000
    assert burst_label not in _fire(edge.address, 3, threads=1)
    now[0] += 1000
    assert _fire(edge.address, 5, threads=1)[burst_label] >= 4  # (one may be a local probe)
    assert edge.router.burst.budget.snapshot().requests >= 4  # type: ignore[union-attr]


def test_spent_budget_serves_locally_and_the_cost_is_reported(rig: AgentRig) -> None:
    art = rig.bundles.build(version=1)
    digest = rig.server.add(art.root)
    cloud: Agent = rig.make_agent(serve_only=True, model_dir=art.root, device_id="")
    edge: Agent = rig.agent(
        burst=cloud.address, burst_price_per_1k=1.0, burst_budget=B / 1000, data_dir=rig.bundles.tmp / "edge"
    )
    rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=digest, version=1))
    rig.fleet.wait_serving("mlp", digest)
    now = [1_000_000.0]
    _overload_with_clock(edge, now)
    seen = _fire(edge.address, B + 60)
    assert seen[f"burst:{cloud.address}"] == B and seen["local"] == 60  # nothing refused, none lost
    held = edge.router.burst.budget.snapshot().held_back  # type: ignore[union-attr]
    assert 0 < held <= 60  # the rest were the agent's idle probes, local anyway

    def spent() -> mpb.ReportedState | None:
        rs = rig.fleet.latest()
        return rs if rs is not None and rs.stats.burst_held_back == held else None

    rs = wait_for(spent, 20, "a report with the spent budget")
    assert rs.stats.burst_cost == pytest.approx(B / 1000) and rs.stats.burst_budget == pytest.approx(B / 1000)


def test_budget_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs a price"):
        AgentConfig(serve_only=True, model_dir=".", burst_budget=1.0).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="local or refuse"):
        AgentConfig(serve_only=True, model_dir=".", burst_when_spent="queue").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="negative"):
        AgentConfig(serve_only=True, model_dir=".", burst_price_per_1k=-1).validate()  # type: ignore[arg-type]
