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
from dataclasses import dataclass, field

import grpc

from edgectl.agent.errors import BurstUnavailableError, InvalidInputError, ModelNotFoundError
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

    def available(self) -> bool:
        """Would a call go out now? (A peek: the half-open trial is taken by ``infer`` itself.)"""
        return self.breaker.state != "open"

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Forward the request unchanged; BurstUnavailableError when the breaker is open or the call fails."""
        if not self.breaker.allow():
            raise BurstUnavailableError(f"burst endpoint {self.target} is open-circuited after failures")
        try:
            response: pb.ModelInferResponse = self._stub.ModelInfer(request, timeout=self.settings.timeout_s)
        except grpc.RpcError as exc:
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
        self.breaker.success()
        return response

    def close(self) -> None:
        self._channel.close()
