"""Local-or-burst routing: overflow and failures go to a remote V2 endpoint behind a circuit breaker.

A request runs locally unless the local queue's predicted wait exceeds the latency SLO, or the
model is missing or failing here; then it goes to the configured remote KServe V2 endpoint
(another agent, Triton, KServe). Routing is decided per request, so traffic fails back by
itself once local capacity returns. Every response names where it was served.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import grpc

from edgectl.agent.codecs import Array, encode_response
from edgectl.agent.errors import (
    BurstUnavailableError,
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.serving import ModelRegistry
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVED_BY = "served_by"
LOCAL = "local"
PROBE_AFTER_BURSTS = 8


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
        self._channel = grpc.insecure_channel(
            settings.target,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def available(self) -> bool:
        return self.breaker.allow()

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Forward the request unchanged; BurstUnavailableError when the breaker is open or the call fails."""
        if not self.breaker.allow():
            raise BurstUnavailableError(f"burst endpoint {self.target} is open-circuited after failures")
        try:
            response: pb.ModelInferResponse = self._stub.ModelInfer(request, timeout=self.settings.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                self.breaker.success()  # the endpoint works; the request is bad
                raise InvalidInputError(f"burst endpoint refused the request: {exc.details()}") from exc
            self.breaker.failure()
            raise BurstUnavailableError(
                f"burst endpoint {self.target} failed: {code.name} {exc.details()}"
            ) from exc
        self.breaker.success()
        return response

    def close(self) -> None:
        self._channel.close()


class InferenceRouter:
    """Decides local or burst for each request and answers with ``served_by`` set."""

    def __init__(self, registry: ModelRegistry, metrics: AgentMetrics, settings: BurstSettings) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.burst = BurstClient(settings) if settings.target else None
        self._bursts_in_a_row = 0  # approximate under concurrency, which is all a probe needs
        self._corrections: dict[str, LatencyCorrection] = {}

    def _route(self, name: str) -> tuple[str | None, float]:
        """(why this request should go to burst, or None to serve it locally; predicted local s)."""
        if self.burst is None:
            return None, 0.0
        served = self.registry.get(name)
        if served is None:
            return "model not loaded here", 0.0
        if served.failing:
            return "local model is failing", 0.0
        wait = served.batcher.predicted_wait_s()
        # The estimate is refreshed only by local runs: after a run of bursts, an idle model gets
        # one request, so a spike that slowed a few runs cannot keep traffic away for good.
        if self._bursts_in_a_row >= PROBE_AFTER_BURSTS and served.batcher.idle:
            return None, wait
        expected = wait + self._correction(name).margin()
        limit = self.settings.slo_s * self.settings.headroom
        if expected > limit:
            return f"predicted local latency {expected * 1000:.1f} ms exceeds {limit * 1000:.0f} ms", wait
        return None, wait

    def _correction(self, name: str) -> LatencyCorrection:
        corr = self._corrections.get(name)
        if corr is None:
            corr = self._corrections.setdefault(name, LatencyCorrection())
        return corr

    def infer(self, request: pb.ModelInferRequest, feeds: dict[str, Array] | None) -> pb.ModelInferResponse:
        """Serve one request; ``feeds`` are the decoded inputs (None when they could not be decoded here)."""
        name = request.model_name
        start = time.perf_counter()
        served_by = LOCAL
        ok = False
        try:
            why, predicted = self._route(name)
            if why is not None and self.burst is not None and self.burst.available():
                try:
                    response = self._burst(request)
                    served_by = self.burst.label
                    self._bursts_in_a_row += 1
                    ok = True
                    return response
                except BurstUnavailableError as exc:
                    log.info("burst failed, serving locally: %s", exc)
            self._bursts_in_a_row = 0
            response = self._local(request, feeds)
            if self.burst is not None:
                self._correction(name).observe(predicted, time.perf_counter() - start)
            ok = True
            return response
        except (InferenceError, ModelUnavailableError, ModelNotFoundError) as exc:
            # The local side cannot serve it: burst is the last resort, when its circuit allows.
            if self.burst is not None and self.burst.available() and not isinstance(exc, InvalidInputError):
                response = self._burst(request)
                served_by = self.burst.label
                ok = True
                return response
            raise
        finally:
            self.metrics.observe_request(name, served_by, ok, time.perf_counter() - start)

    def _local(self, request: pb.ModelInferRequest, feeds: dict[str, Array] | None) -> pb.ModelInferResponse:
        if feeds is None:
            raise InvalidInputError("the request's inputs could not be decoded")
        if request.model_version:
            served = self.registry.require(request.model_name)
            if request.model_version != str(served.model.version):
                raise ModelNotFoundError(
                    f"model {request.model_name!r} version {request.model_version} is not served "
                    f"(serving version {served.model.version})"
                )
        outputs, model = self.registry.infer(request.model_name, feeds, self.settings.local_timeout_s)
        requested = [o.name for o in request.outputs]
        unknown = [n for n in requested if n not in outputs]
        if unknown:
            raise InvalidInputError(
                f"model {model.name!r} has no outputs {unknown}; it has {sorted(outputs)}"
            )
        return encode_response(
            model.name, str(model.version), request.id, outputs, requested, {SERVED_BY: LOCAL}
        )

    def _burst(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        assert self.burst is not None
        response = self.burst.infer(request)
        # A remote agent names itself "local": what matters to our caller is that we sent it away.
        response.parameters[SERVED_BY].string_param = self.burst.label
        return response

    def close(self) -> None:
        if self.burst is not None:
            self.burst.close()
