"""The fleet burst budget's ledger against the agents' own accounting (edgectl.agent.burst's
BurstBudget with a FleetAllowance), messages passed by hand with a lag: reports reach the
ledger and grants reach the agents several requests late, as over a loaded broker.

Whatever the lag, the fleet never spends more than its budget, stops within 1 % of it, a restarted
agent cannot spend its previous run's grant again, and a new period grants afresh."""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgectl.agent.burst import BurstBudget, BurstCost
from edgectl.agent.errors import BudgetExhaustedError, BurstBudgetSpentError
from edgectl.agent.fleet_grant import FleetAllowance
from edgectl.control_plane.burst_grants import BurstGrants, FleetBurstBudget, GrantLedger
from edgectl.control_plane.errors import InvalidArgument
from edgectl.mqtt.wire import DeviceTopics
from edgectl.protos.v1 import mqtt_pb2

PRICE = 1.0  # per 1,000 requests: one request costs 0.001
B = 1000  # requests per period


class Device:
    """One agent's budget, its reports to the ledger and the grants back, each ``lag`` steps late."""

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self.low = False  # on_low runs under the budget's lock: only note it, as the agent queues a report
        self.allowance = FleetAllowance(on_low=lambda: setattr(self, "low", True))
        self.budget = BurstBudget(
            BurstCost(per_1k_requests=PRICE, when_spent="refuse"), clock, self.allowance
        )
        self.outbox: collections.deque[tuple[int, mqtt_pb2.ServingStats]] = collections.deque()
        self.inbox: collections.deque[tuple[int, mqtt_pb2.BurstGrant]] = collections.deque()
        self.step = 0
        self.bursts = 0

    def report(self) -> None:
        g = self.budget.snapshot().grant
        assert g is not None
        stats = mqtt_pb2.ServingStats(
            burst_session=g.session, burst_grant_period=g.period_start, burst_grant=g.allowance,
            burst_grant_spent=g.spent, burst_cost=self.budget.snapshot().cost,
            burst_request_price=self.budget.snapshot().request_price,
        )  # fmt: skip
        self.outbox.append((self.step, stats))

    def burst_once(self) -> bool:
        self.step += 1
        try:
            self.budget.reserve()
        except BudgetExhaustedError:
            return False
        finally:
            if self.low:
                self.low = False
                self.report()
        self.bursts += 1
        return True


def run(ledger: GrantLedger, devices: list[Device], steps: int, lag: int) -> None:
    """Every device tries one burst per step; messages older than ``lag`` steps are delivered."""
    for _ in range(steps):
        for d in devices:
            d.burst_once()
            while d.outbox and d.outbox[0][0] <= d.step - lag:
                grant = ledger.observe(d.name, d.outbox.popleft()[1])
                if grant is not None:
                    d.inbox.append((d.step, grant))
            while d.inbox and d.inbox[0][0] <= d.step - lag:
                d.allowance.apply(d.inbox.popleft()[1])


def start(ledger: GrantLedger, devices: list[Device]) -> None:
    """Each agent's first report (at connect), answered with its first grant."""
    for d in devices:
        d.report()
        grant = ledger.observe(d.name, d.outbox.popleft()[1])
        assert grant is not None and grant.allowance > 0
        d.allowance.apply(grant)


@pytest.mark.parametrize("lag", [0, 5, 40])
def test_three_devices_never_pass_the_fleet_budget_and_stop_within_1_percent(lag: int) -> None:
    now = [1_000_000.0]
    ledger = GrantLedger(FleetBurstBudget(B * PRICE / 1000, 3600), clock=lambda: now[0])
    devices = [Device(f"dev-{i}", lambda: now[0]) for i in range(3)]
    start(ledger, devices)
    run(ledger, devices, 2 * B, lag)
    total = sum(d.bursts for d in devices)
    assert B * 0.99 <= total <= B, (total, [d.bursts for d in devices])
    assert total == B  # grants in whole requests: none is left as an unspendable fraction
    assert ledger.committed() <= ledger._limit
    # All stop: nothing more is granted and every device refuses.
    assert not any(d.burst_once() for d in devices)
    # Roll-over: every known agent gets a fresh grant for the new period, and bursts again.
    now[0] += 3600
    grants = ledger.roll()
    assert sorted(g.device_id for g in grants) == ["dev-0", "dev-1", "dev-2"]
    for d, g in zip(devices, grants, strict=True):
        assert g.period_start == ledger.period and g.allowance > 0
        d.allowance.apply(g)
        assert d.burst_once()


def test_a_restarted_agent_cannot_spend_its_previous_runs_grant_again() -> None:
    ledger = GrantLedger(FleetBurstBudget(B * PRICE / 1000, 3600), clock=lambda: 1_000_000.0)
    first = Device("dev-0", lambda: 1_000_000.0)
    start(ledger, [first])
    run(ledger, [first], 2 * B, lag=3)
    assert B * 0.99 <= first.bursts <= B
    # The agent restarts: a new session. The retained grant of the last run allows it nothing.
    again = Device("dev-0", lambda: 1_000_000.0)
    old_grant = mqtt_pb2.BurstGrant(
        device_id="dev-0", session=first.allowance.session, period_start=ledger.period, period_s=3600,
        allowance=B * PRICE / 1000,
    )  # fmt: skip
    again.allowance.apply(old_grant)
    assert not again.burst_once()
    again.report()
    grant = ledger.observe("dev-0", again.outbox.popleft()[1])
    assert grant is not None and grant.session == again.allowance.session and grant.exhausted
    again.allowance.apply(grant)
    run(ledger, [again], 50, lag=0)
    assert first.bursts + again.bursts <= B


def test_an_agent_without_grants_is_counted_and_a_late_device_shares_what_is_left() -> None:
    ledger = GrantLedger(FleetBurstBudget(1.0, 3600), clock=lambda: 1_000_000.0)
    # An older agent reports no session, only its own period's cost: 0.4 of the 1.0.
    assert ledger.observe("old", mqtt_pb2.ServingStats(burst_cost=0.4)) is None
    late = Device("late", lambda: 1_000_000.0)
    start(ledger, [late])
    run(ledger, [late], 2000, lag=2)
    assert 590 <= late.bursts <= 600  # 0.6 left at 0.001 a request
    assert ledger.committed() == 1_000_000_000  # all of it granted, nothing beyond it


def test_no_grant_means_no_fleet_limit_and_an_empty_grant_lifts_it() -> None:
    allowance = FleetAllowance()
    budget = BurstBudget(BurstCost(per_1k_requests=PRICE, when_spent="refuse"), fleet=allowance)
    for _ in range(5):
        budget.reserve()  # no grant ever received: unlimited, as before fleet budgets
    allowance.apply(mqtt_pb2.BurstGrant(session="someone-else", period_start=3600, period_s=3600))
    with pytest.raises(BudgetExhaustedError, match="share of the fleet burst budget"):
        budget.reserve()
    allowance.apply(None)  # the control plane dropped its fleet budget
    budget.reserve()


def test_a_spent_grant_under_when_spent_local_keeps_requests_here() -> None:
    allowance = FleetAllowance(session="s1")
    budget = BurstBudget(BurstCost(per_1k_requests=PRICE, when_spent="local"), fleet=allowance)
    grant = mqtt_pb2.BurstGrant(
        session="s1", period_start=3600, period_s=3600, allowance=0.002, exhausted=True, fleet_budget=0.5
    )
    allowance.apply(grant)
    assert not budget.hold_back()
    budget.reserve()
    budget.reserve()  # the two requests granted
    assert budget.hold_back()  # the router serves the next one locally without trying the endpoint
    with pytest.raises(
        BurstBudgetSpentError, match=r"fleet burst budget of 0\.5 per 3600 s is spent: serving locally"
    ):
        budget.reserve()
    assert budget.snapshot().held_back == 2 and budget.snapshot().grant.spent == pytest.approx(0.002)  # type: ignore[union-attr]


def test_budget_settings_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="0 or more"):
        FleetBurstBudget(-1.0)
    with pytest.raises(InvalidArgument, match="whole number of seconds"):
        FleetBurstBudget(1.0, period_s=0.5)


def test_without_a_fleet_budget_grants_agents_still_hold_are_cleared_once() -> None:
    sent: list[tuple[str, bytes]] = []
    grants = BurstGrants(None, lambda topic, payload: sent.append((topic, payload)))
    holding = mqtt_pb2.ReportedState(stats=mqtt_pb2.ServingStats(burst_session="s1", burst_grant_period=3600))
    grants.observe("dev-0", holding)
    grants.observe("dev-0", holding)
    grants.observe("dev-1", mqtt_pb2.ReportedState(stats=mqtt_pb2.ServingStats(burst_session="s2")))
    assert sent == [(DeviceTopics("dev-0").burst_grant, b"")]  # an empty retained grant: no fleet budget


def test_a_device_arriving_after_the_budget_is_spent_is_told_so_once() -> None:
    ledger = GrantLedger(FleetBurstBudget(0.5, 3600), clock=lambda: 1_000_000.0)
    assert (
        ledger.observe("old", mqtt_pb2.ServingStats(burst_cost=0.5)) is None
    )  # all of it, by an older agent
    stats = mqtt_pb2.ServingStats(burst_session="s-late")
    grant = ledger.observe("late", stats)
    assert grant is not None and grant.allowance == 0 and grant.exhausted
    late = FleetAllowance(session="s-late")
    late.apply(grant)
    assert late.blocks(1)  # it may not burst at all
    assert ledger.observe("late", stats) is None  # its heartbeats do not resend the same answer


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fleet-burst-budget", "-1"], "0 or more"),
        (["--fleet-burst-budget", "5", "--fleet-burst-period", "500ms"], "whole number of seconds"),
        (["--fleet-burst-budget", "5", "--fleet-burst-period", "soon"], "duration 'soon' is not understood"),
    ],
)
def test_serve_refuses_a_bad_fleet_budget_with_one_clear_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    # Checked before anything is opened or bound (nothing is written to the working directory).
    cmd = [sys.executable, "-m", "edgectl", "control-plane", "serve", "--insecure", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode not in (0, 1) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
