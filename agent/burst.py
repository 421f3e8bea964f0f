"""The burst endpoint: a V2 gRPC client behind a circuit breaker, and the latency model that
decides when to use it (``edgectl.agent.router`` makes the per-request choice).

Only the endpoint's own trouble (unavailable, timeouts, internal errors) counts against the
circuit; a caller-side answer such as NOT_FOUND or INVALID_ARGUMENT shows the endpoint works.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc

from edgectl.agent.errors import (
    BudgetExhaustedError,
    BurstBudgetSpentError,
    BurstUnavailableError,
    InvalidInputError,
    ModelNotFoundError,
)
from edgectl.agent.fleet_grant import FleetAllowance, GrantSnapshot
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Answers about the request, not the endpoint: the endpoint is up, the circuit stays closed.
CALLER_SIDE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.ALREADY_EXISTS: InvalidInputError,
}


NANO = 1_000_000_000  # costs are kept in integer billionths of a currency unit: exact sums


@dataclass(frozen=True)
class BurstCost:
    """What the burst endpoint costs and how much of it one device may spend per period."""

    per_1k_requests: float = 0.0  # price of 1,000 requests sent to the endpoint
    per_second: float = 0.0  # price of one second of endpoint time (each burst call's duration)
    budget: float | None = None  # per device and period; None: no limit (cost is still counted)
    period_s: float = 3600.0  # budgets reset at multiples of this (wall clock, UTC)
    when_spent: Literal["local", "refuse"] = "local"  # then serve locally, or refuse RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class BudgetSnapshot:
    """This period's burst spending: cost so far, the budget (None: none), requests kept from burst."""

    cost: float
    budget: float | None
    requests: int
    held_back: int
    period_start: float
    grant: GrantSnapshot | None = None  # the fleet budget's side, when the agent can take grants
    request_price: float = 0.0  # one burst request's price


class BurstBudget:
    """Counts burst cost per period and says whether one more burst fits the budget.

    A burst's request price is reserved before the call (under a lock, so concurrent callers can
    never overshoot it); its time price is added when the call returns, so with per-second
    pricing the budget can be passed by at most the calls already in flight.
    """

    def __init__(
        self, cost: BurstCost, clock: Callable[[], float] = time.time, fleet: FleetAllowance | None = None
    ) -> None:
        self.cost = cost
        self._clock = clock
        self.fleet = fleet  # this device's grant of the fleet's budget, when the control plane sets one
        self._per_request = round(cost.per_1k_requests * NANO / 1000)
        self._budget = None if cost.budget is None else round(cost.budget * NANO)
        self._lock = threading.Lock()
        self._period = self._period_of(clock())
        self._spent = 0
        self._requests = 0
        self._held_back = 0
        self.total = 0.0  # all periods, for the cumulative metric

    def _period_of(self, now: float) -> float:
        return now - now % self.cost.period_s

    def _roll(self) -> None:
        period = self._period_of(self._clock())
        if period != self._period:
            self._period, self._spent, self._requests, self._held_back = period, 0, 0, 0

    def _spent_now(self) -> bool:
        return self._own_spent() or self._fleet_spent()

    def _own_spent(self) -> bool:
        return self._budget is not None and (
            self._spent + self._per_request > self._budget or self._spent >= self._budget
        )

    def _fleet_spent(self) -> bool:
        return self.fleet is not None and self.fleet.blocks(self._per_request)

    def _add(self, nano: int) -> None:
        self._spent += nano
        self.total += nano / NANO
        if self.fleet is not None:
            self.fleet.charge(nano)

    def hold_back(self) -> bool:
        """True (and counted) when the budget is spent and spent means "serve locally": the router
        then keeps the request here without trying the endpoint."""
        if (self._budget is None and self.fleet is None) or self.cost.when_spent != "local":
            return False
        with self._lock:
            self._roll()
            if self._spent_now():
                self._held_back += 1
                return True
            return False

    def reserve(self) -> None:
        """Charge one burst request, or raise (BurstBudgetSpentError: serve locally;
        BudgetExhaustedError: refuse) when it would pass this period's budget."""
        with self._lock:
            self._roll()
            if self._own_spent():
                self._held_back += 1
                left = self.cost.period_s - (self._clock() - self._period)
                why = (
                    f"the burst budget of {self.cost.budget} per {self.cost.period_s:.0f} s is spent "
                    f"({self._requests} requests this period; it resets in {left:.0f} s)"
                )
                if self.cost.when_spent == "refuse":
                    raise BudgetExhaustedError(why + ": retry later, or raise --burst-budget")
                raise BurstBudgetSpentError(why + ": serving locally")
            if self.fleet is not None and self._fleet_spent():
                self._held_back += 1
                why = self.fleet.describe()
                if self.cost.when_spent == "refuse":
                    raise BudgetExhaustedError(why + ": retry later (the next period restores it)")
                raise BurstBudgetSpentError(why + ": serving locally")
            self._requests += 1
            self._add(self._per_request)

    def refund(self) -> None:
        """Give back one reserved request that was never sent (same period only)."""
        with self._lock:
            if self._requests > 0 and self._period == self._period_of(self._clock()):
                self._requests -= 1
                self._add(-self._per_request)

    def charge_time(self, seconds: float) -> None:
        """Add the endpoint-time price of one finished burst call."""
        nano = round(self.cost.per_second * seconds * NANO)
        if nano:
            with self._lock:
                self._roll()
                self._add(nano)

    def snapshot(self) -> BudgetSnapshot:
        """This period's numbers."""
        with self._lock:
            self._roll()
            grant = self.fleet.snapshot() if self.fleet is not None else None
            return BudgetSnapshot(
                self._spent / NANO,
                self.cost.budget,
                self._requests,
                self._held_back,
                self._period,
                grant,
                self._per_request / NANO,
            )


@dataclass(frozen=True)
class BurstSettings:
    """Where and when to burst."""

    target: str | None = None  # HOST:PORT of a V2 gRPC endpoint
    slo_s: float = 0.1  # the latency SLO of one request
    # A request goes to burst when its predicted local latency exceeds this share of the SLO; the
    # rest is left to what the agent cannot see (the client's stack and the network).
    headroom: float = 0.8
    timeout_s: float = 2.0
    failure_threshold: int = 3
    reset_after_s: float = 5.0
    local_timeout_s: float = 30.0
    # TLS (and a bearer token or client certificate) to the endpoint; None: plaintext.
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False, compare=False)
    cost: BurstCost = BurstCost()
    # This device's grant of the fleet's budget (edgectl.agent.fleet_grant); None: no fleet side.
    fleet: FleetAllowance | None = field(default=None, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)  # budget periods


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open after a pause (one trial) -> closed."""

    def __init__(self, failure_threshold: int, reset_after_s: float) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if time.monotonic() - self._opened_at >= self.reset_after_s else "open"

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one trial call at a time."""
        with self._lock:
            if self._opened_at is None:
                return True
            if time.monotonic() - self._opened_at < self.reset_after_s or self._trial:
                return False
            self._trial = True
            return True

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial = False
            if self._failures >= self.failure_threshold or self._opened_at is not None:
                self._opened_at = time.monotonic()


class LatencyCorrection:
    """Learns how far real local latencies run past the queue model's prediction.

    ``margin`` is the 95th percentile of the last residuals (actual - predicted): it covers thread
    hand-offs, codec work and runs slowed by a busy host, so the prediction errs to the safe side
    by what it has seen, without letting a few outliers send all traffic away. Until enough
    residuals are in, it is their mean plus four mean deviations (as TCP estimates its RTO).
    """

    WINDOW = 256
    MIN_SAMPLES = 32
    QUANTILE = 0.95

    def __init__(self) -> None:
        self.mean_s = 0.0
        self.dev_s = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._quantile_s: float | None = None
        self._seen = 0
        self._lock = threading.Lock()

    def observe(self, predicted_s: float, actual_s: float) -> None:
        err = actual_s - predicted_s
        with self._lock:
            self.dev_s += 0.25 * (abs(err - self.mean_s) - self.dev_s)
            self.mean_s += 0.125 * (err - self.mean_s)
            self._recent.append(err)
            self._seen += 1
            if len(self._recent) >= self.MIN_SAMPLES and (self._quantile_s is None or self._seen % 16 == 0):
                ordered = sorted(self._recent)
                self._quantile_s = ordered[int(self.QUANTILE * (len(ordered) - 1))]

    def margin(self) -> float:
        if self._quantile_s is not None:
            return self._quantile_s
        return self.mean_s + 4.0 * self.dev_s


class BurstClient:
    """A V2 gRPC client to the burst endpoint with a timeout and a circuit breaker."""

    def __init__(self, settings: BurstSettings) -> None:
        assert settings.target is not None
        self.target = settings.target
        self.label = f"burst:{settings.target}"
        self.settings = settings
        self.breaker = CircuitBreaker(settings.failure_threshold, settings.reset_after_s)
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.tls = settings.credentials is not None
        self._channel = (
            grpc.secure_channel(settings.target, settings.credentials, options=options)
            if settings.credentials is not None
            else grpc.insecure_channel(settings.target, options=options)
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.budget = BurstBudget(settings.cost, settings.clock, settings.fleet)

    def available(self) -> bool:
        """Would a call go out now? (A peek: the half-open trial is taken by ``infer`` itself.)"""
        return self.breaker.state != "open"

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Forward the request unchanged; BurstUnavailableError when the breaker is open or the call fails."""
        self.budget.reserve()  # charged even if the call then fails: the budget is never overspent
        if not self.breaker.allow():
            self.budget.refund()  # nothing was sent
            raise BurstUnavailableError(f"burst endpoint {self.target} is open-circuited after failures")
        start = time.monotonic()
        try:
            response: pb.ModelInferResponse = self._stub.ModelInfer(request, timeout=self.settings.timeout_s)
        except grpc.RpcError as exc:
            self.budget.charge_time(time.monotonic() - start)
            code = exc.code()
            caller_side = CALLER_SIDE.get(code)
            if caller_side is not None:
                self.breaker.success()  # the endpoint works; it said no to this request
                raise caller_side(f"burst endpoint {self.target}: {code.name} {exc.details()}") from exc
            self.breaker.failure()
            why = f"burst endpoint {self.target} failed: {code.name} {exc.details()}"
            if code == grpc.StatusCode.UNAVAILABLE and self.tls:
                why += (
                    " (TLS: is --burst-ca the CA that signed the endpoint's certificate, for this host name?)"
                )
            elif code == grpc.StatusCode.UNAUTHENTICATED:
                why += " (check --burst-token-file / --burst-cert)"
            log.warning("%s", why)
            raise BurstUnavailableError(why) from exc
        self.budget.charge_time(time.monotonic() - start)
        self.breaker.success()
        return response

    def close(self) -> None:
        self._channel.close()
