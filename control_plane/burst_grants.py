"""The fleet's burst budget: shares of it granted to agents, refilled as they spend them.

Reports lag, so the control plane does not wait to see the fleet's cost reach the budget: it
hands each agent run (a device's ``session``) an allowance on ``burst/grant`` and never grants
more than the budget in total. An agent stops bursting at its allowance and reports at once when
half of its last grant is spent; the leader then grants a share of what is left (half of it split
by the devices that take grants), so the shares shrink as the budget runs out and the last ones
go to the devices still bursting. The fleet total is thus at most the budget, and short of it by
at most the allowances that idle or offline devices hold (plus one request's price per device).
A device offline keeps its last grant only. At the period's end every device gets a fresh grant.

Agents that predate grants (no session in their report) are not held back here; their reported
cost is counted against the budget, and their own ``--burst-budget`` still applies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgectl.control_plane.device_state import DeviceRecord
from edgectl.control_plane.errors import InvalidArgument
from edgectl.logs import name_os_thread
from edgectl.mqtt.wire import DeviceTopics, encode
from edgectl.protos.v1 import fleet_pb2, mqtt_pb2

log = logging.getLogger(__name__)
NANO = 1_000_000_000  # the agents' integer billionths of a currency unit
MIN_SHARE = 0.005  # no grant below this part of the budget (unless less is left): few round trips at the end


@dataclass(frozen=True)
class FleetBurstBudget:
    """What the whole fleet may spend on burst per period (the agents' --burst-price-* currency)."""

    amount: float
    period_s: float = 3600.0

    def __post_init__(self) -> None:
        if not self.amount >= 0:
            raise InvalidArgument(f"--fleet-burst-budget must be 0 or more, got {self.amount}")
        if not self.period_s >= 1 or self.period_s != int(self.period_s):
            raise InvalidArgument(
                f"--fleet-burst-period must be a whole number of seconds >= 1, got {self.period_s}"
            )

    def period_of(self, now: float) -> int:
        """The start of the period holding ``now`` (periods start at multiples of period_s, UTC)."""
        return int(now - now % self.period_s)


@dataclass
class _Device:
    session: str = ""  # "": an agent that predates grants
    granted: int = 0  # cumulative allowance of this session in this period (nano)
    spent: int = 0  # what the session reported spent of it
    sunk: int = 0  # earlier sessions' commitment this period: granted or spent, whichever is more
    last_chunk: int = 0
    legacy: int = 0  # the reported cost of an agent that takes no grants
    price: int = 0  # one request's price on this device (0: unknown, an agent without request pricing)
    told_spent: bool = False  # sent "nothing left" to this session this period: once is enough


class GrantLedger:
    """Grants and reported spending per device for the current period; not thread-safe (the owner
    serializes). ``observe`` and ``roll`` return the grants to publish."""

    def __init__(self, budget: FleetBurstBudget, clock: Callable[[], float] = time.time) -> None:
        self.budget = budget
        self.clock = clock
        self.period = budget.period_of(clock())
        self._limit = round(budget.amount * NANO)
        self._devices: dict[str, _Device] = {}

    def committed(self) -> int:
        """What the fleet may have spent this period at most (nano): grants, or costs beyond them."""
        return sum(d.sunk + max(d.granted, d.spent) + d.legacy for d in self._devices.values())

    def spent(self) -> int:
        return sum(d.spent + d.legacy for d in self._devices.values())

    def observe(self, device_id: str, stats: mqtt_pb2.ServingStats) -> mqtt_pb2.BurstGrant | None:
        """Take one device's reported spending; a grant to send it when it needs one."""
        d = self._devices.setdefault(device_id, _Device())
        d.price = max(0, round(stats.burst_request_price * NANO))
        if not stats.burst_session:
            d.legacy = round(stats.burst_cost * NANO)  # its own period: the best count we have
            return None
        current = stats.burst_grant_period == self.period
        if stats.burst_session != d.session:
            if d.session or not current:  # a new run of the agent: what the last one held is sunk
                d.sunk += max(d.granted, d.spent)
                d.granted = d.spent = d.last_chunk = 0
                d.told_spent = False
            else:  # first sight (a new leader): adopt what the agent holds for this period
                d.granted = d.last_chunk = round(stats.burst_grant * NANO)
                d.spent = round(stats.burst_grant_spent * NANO)
            d.session = stats.burst_session
        elif current:
            d.spent = max(d.spent, round(stats.burst_grant_spent * NANO))
        if d.granted and (not current or d.granted - d.spent > d.last_chunk // 2):
            return None  # still holding enough, or the agent has yet to see its grant for this period
        return self._grant(device_id, d)

    def _grant(self, device_id: str, d: _Device) -> mqtt_pb2.BurstGrant | None:
        free = self._limit - self.committed()
        takers = max(1, sum(1 for x in self._devices.values() if x.session))
        chunk = max(free // (2 * takers), min(free, round(self._limit * MIN_SHARE)))
        if d.price and free >= d.price:  # whole requests: a fraction of one could never be spent
            chunk = min(max(chunk - chunk % d.price, d.price), free - free % d.price)
        if chunk <= 0 and (d.granted or d.told_spent):
            return None  # nothing left to give: the allowance it holds is its last
        d.told_spent = chunk <= 0
        d.granted = max(d.granted, d.spent) + max(chunk, 0)
        d.last_chunk = max(chunk, 0)
        return self._message(device_id, d, exhausted=free - chunk < max(d.price, 1))

    def _message(self, device_id: str, d: _Device, exhausted: bool) -> mqtt_pb2.BurstGrant:
        now = Timestamp()
        now.FromNanoseconds(int(self.clock() * 1e9))
        return mqtt_pb2.BurstGrant(
            device_id=device_id,
            session=d.session,
            period_start=self.period,
            period_s=int(self.budget.period_s),
            allowance=d.granted / NANO,
            fleet_budget=self.budget.amount,
            exhausted=exhausted,
            issued_at=now,
        )

    def roll(self) -> list[mqtt_pb2.BurstGrant]:
        """At a new period: forget the last one's spending and grant every known session afresh."""
        period = self.budget.period_of(self.clock())
        if period == self.period:
            return []
        self.period = period
        for d in self._devices.values():
            d.granted = d.spent = d.sunk = d.last_chunk = d.legacy = 0
            d.told_spent = False
        takers = [(i, d) for i, d in sorted(self._devices.items()) if d.session]
        out = []
        for device_id, d in takers:
            chunk = self._limit // (2 * len(takers))
            d.granted = d.last_chunk = chunk
            out.append(self._message(device_id, d, exhausted=chunk == 0))
        return out

    def forget(self, device_id: str) -> None:
        """A decommissioned device: its grant is no one's any more (what it spent stays counted)."""
        d = self._devices.get(device_id)
        if d is not None:
            d.sunk, d.granted, d.session, d.last_chunk = d.sunk + max(d.granted, d.spent), 0, "", 0
            d.spent = 0

    def devices(self) -> Iterator[tuple[str, float, float, bool]]:
        """(device, cost, allowance, takes grants) for this period."""
        for device_id, d in sorted(self._devices.items()):
            yield device_id, (d.spent + d.legacy) / NANO, max(d.granted, d.spent) / NANO, bool(d.session)


class BurstGrants:
    """The leader's side: keeps the ledger, publishes grants (retained, QoS 1), rolls periods.

    With no fleet budget configured it only clears the grants agents still hold from an earlier
    configuration, so they burst under their own budgets again.
    """

    def __init__(
        self,
        budget: FleetBurstBudget | None,
        publish: Callable[[str, bytes], object],
        clock: Callable[[], float] = time.time,
        tick_s: float = 1.0,
    ) -> None:
        self.budget = budget
        self._publish = publish
        self.clock = clock
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self.ledger = GrantLedger(budget, clock) if budget is not None else None
        self._cleared: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def observe(self, device_id: str, state: mqtt_pb2.ReportedState) -> None:
        """One reported state (the ingest thread): refill this device's grant when it needs it."""
        with self._lock:
            if self.ledger is None:
                if state.stats.burst_grant_period and device_id not in self._cleared:
                    self._cleared.add(device_id)
                    self._publish(DeviceTopics(device_id).burst_grant, b"")  # no fleet budget any more
                return
            grants = self.ledger.roll()
            grant = self.ledger.observe(device_id, state.stats)
            # Published under the lock: one device's grants leave in the order they were made.
            self._send([*grants, *([grant] if grant is not None else [])])

    def _send(self, grants: list[mqtt_pb2.BurstGrant]) -> None:
        for g in grants:
            self._publish(DeviceTopics(g.device_id).burst_grant, encode(g))

    def tick(self) -> None:
        """Roll the period when it ends (the next period's grants go out at once)."""
        if self.ledger is None:
            return
        with self._lock:
            grants = self.ledger.roll()
            self._send(grants)
        if grants:
            log.info("fleet burst budget: a new period", extra={"devices": len(grants)})

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="burst-grants", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_os_thread()
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("fleet burst budget tick failed")

    def stop(self) -> None:
        """Stop (leadership lost): the next leader rebuilds the ledger from the retained reports."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self.ledger = GrantLedger(self.budget, self.clock) if self.budget is not None else None
            self._cleared.clear()


def budget_status(
    devices: list[DeviceRecord], budget: FleetBurstBudget | None, now: float
) -> fleet_pb2.BurstBudgetStatus:
    """The period's spending summed from the devices' stored reports (the same on every replica).

    A device that takes grants counts what it spent of this period's grant; an older agent counts
    its own period's cost (its only figure)."""
    period_s = budget.period_s if budget is not None else 3600.0
    period = int(now - now % period_s)
    out = fleet_pb2.BurstBudgetStatus(budget=budget.amount if budget else 0.0, period_seconds=int(period_s))
    out.period_start.FromSeconds(period)
    for d in devices:
        stats = d.stats or {}
        follows = bool(stats.get("burst_session"))
        this_period = int(stats.get("burst_grant_period", 0)) == period
        if follows:
            cost = float(stats.get("burst_grant_spent", 0.0)) if this_period else 0.0
            granted = float(stats.get("burst_grant", 0.0)) if this_period else 0.0
        else:
            cost, granted = float(stats.get("burst_cost", 0.0)), 0.0
        if not cost and not granted and not follows:
            continue  # never burst: nothing to show
        out.devices.add(
            device_id=d.id, cost=cost, granted=max(granted, cost), follows_grants=follows, online=d.online
        )
    out.spent = sum(x.cost for x in out.devices)
    out.granted = sum(x.granted for x in out.devices)
    for x in out.devices:
        x.share = x.cost / out.spent if out.spent else 0.0
    return out


class BurstBudgetCollector(Collector):
    """edgectl_fleet_burst_budget_*: the fleet budget, what is spent and granted of it this period."""

    def __init__(
        self,
        list_devices: Callable[[], list[DeviceRecord]],
        budget: FleetBurstBudget | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.list_devices = list_devices
        self.budget = budget
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            status = budget_status(self.list_devices(), self.budget, self.clock())
        except Exception:
            log.exception("burst budget metrics could not read the state store")
            return
        used = status.spent / status.budget if status.budget else 0.0
        for name, text, value in (
            ("limit", "The fleet's burst budget per period (0: none)", status.budget),
            ("spent", "Burst cost the devices reported this period", status.spent),
            ("granted", "Allowances granted this period (the most the fleet may spend)", status.granted),
            ("used_ratio", "Spent this period / the budget", used),
            ("period_start_seconds", "Start of the current period (unix time)", status.period_start.seconds),
        ):
            g = GaugeMetricFamily(f"edgectl_fleet_burst_budget_{name}", text)
            g.add_metric([], value)
            yield g
