"""This agent's share of the fleet's burst budget: the allowance the control plane grants it on
``edgectl/v1/devices/{id}/burst/grant`` (``BurstGrant`` in protos/v1/mqtt.proto).

The control plane never grants more than the fleet's budget in total, so a fleet whose agents
stop at their allowance stays within it however late their reports arrive. Allowances are
cumulative per agent run (``session``, new at every start) and period: a restarted agent cannot
spend its previous run's grant again, it waits for one addressed to its own session. Until the
first grant arrives (or after an empty one: the fleet budget was removed) nothing is limited here.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from edgectl.protos.v1 import mqtt_pb2 as mpb

NANO = 1_000_000_000  # the same integer billionths of a currency unit as the agent's own budget


@dataclass(frozen=True)
class GrantSnapshot:
    """What the agent reports of its fleet allowance: the period it spends against (0: no grant
    held), the allowance for this session in it and what it spent of it."""

    session: str
    period_start: int
    allowance: float
    spent: float
    fleet_budget: float
    exhausted: bool


class FleetAllowance:
    """The grant this agent run may spend; the burst budget asks it before each burst.

    ``on_low`` is called (once per grant) when half of the last increment is spent, so the agent
    reports at once and the control plane can refill before the allowance runs out.
    """

    def __init__(self, on_low: Callable[[], None] | None = None, session: str | None = None) -> None:
        """``on_low`` runs under the burst budget's lock: it must only queue work (a report)."""
        self.session = session or uuid.uuid4().hex[:16]
        self.on_low = on_low
        self._lock = threading.Lock()
        self._active = False  # a fleet budget exists (a grant, ours or not, was received)
        self._period = 0
        self._period_s = 0
        self._allowance = 0
        self._spent = 0
        self._low_at: int | None = None  # spent at which on_low fires; None: already fired
        self._fleet_budget = 0.0
        self._exhausted = False

    def apply(self, grant: mpb.BurstGrant | None) -> None:
        """Take a grant from the control plane (None or empty: no fleet budget any more)."""
        with self._lock:
            if grant is None or not grant.period_s:
                self._active, self._period, self._allowance, self._spent = False, 0, 0, 0
                return
            self._active = True
            if grant.session != self.session or grant.period_start < self._period:
                return  # an earlier run's grant, or a stale one: it allows this run nothing
            allowance = round(grant.allowance * NANO)
            if grant.period_start != self._period:
                self._period, self._spent, self._allowance = grant.period_start, 0, 0
            self._period_s = int(grant.period_s)
            self._fleet_budget, self._exhausted = grant.fleet_budget, grant.exhausted
            if allowance > self._allowance:
                increment = allowance - self._allowance
                self._allowance = allowance
                self._low_at = None if grant.exhausted else allowance - increment // 2

    def blocks(self, nano: int) -> bool:
        """Would spending ``nano`` more pass the grant? (False when no fleet budget is set.)"""
        with self._lock:
            return self._active and (self._spent + nano > self._allowance or self._spent >= self._allowance)

    def charge(self, nano: int) -> None:
        """Count spent burst cost (negative: a refund of a call never sent)."""
        fire = False
        with self._lock:
            if not self._active:
                return
            self._spent = max(0, self._spent + nano)
            if self._low_at is not None and self._spent >= self._low_at:
                self._low_at, fire = None, True
        if fire and self.on_low is not None:
            self.on_low()  # outside the lock: it only queues a report

    def describe(self) -> str:
        """Why a burst was held back, for the log and a refused request's error."""
        with self._lock:
            if self._exhausted:
                return f"the fleet burst budget of {self._fleet_budget} per {self._period_s} s is spent"
            return (
                f"this device's share of the fleet burst budget is spent "
                f"({self._spent / NANO:g} of {self._allowance / NANO:g} granted; more may be granted)"
            )

    def snapshot(self) -> GrantSnapshot:
        with self._lock:
            period = self._period if self._active else 0
            allowance, spent = self._allowance / NANO, self._spent / NANO
            return GrantSnapshot(self.session, period, allowance, spent, self._fleet_budget, self._exhausted)
