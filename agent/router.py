"""Local-or-burst routing of one inference call, whatever protocol it came in on.

A request runs locally unless the local queue's predicted wait exceeds the latency SLO, or the
model is missing or failing here; then it goes to the configured remote KServe V2 endpoint
(another agent, Triton, KServe). Routing is decided per request, so traffic fails back by
itself once local capacity returns. Inputs are checked against the model's signature from
their headers before anything is decoded; every result names where it was served.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgectl.agent.burst import BurstClient, BurstSettings, LatencyCorrection
from edgectl.agent.codecs import Array
from edgectl.agent.errors import (
    BurstUnavailableError,
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from edgectl.agent.input_check import InputTable, RequestLimits, TensorHeader
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.serving import ModelRegistry, ServedModel
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb

if TYPE_CHECKING:
    from edgectl.agent.canary import Trials

log = logging.getLogger(__name__)

SERVED_BY = "served_by"
LOCAL = "local"
PROBE_AFTER_BURSTS = 8
# A refused request this large leaves its receive buffers as free heap that glibc keeps (65 MiB
# of RSS for one 64 MiB request, benchmarks/bench_serving.py): hand it back to the OS.
TRIM_AFTER_BYTES = 8 << 20
_LIBC: list[Any] = []


def trim_heap() -> None:
    """Return free heap memory to the OS (glibc's malloc_trim; a no-op where there is none)."""
    if not _LIBC:
        name = ctypes.util.find_library("c")
        _LIBC.append(getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


# Not frozen: one of each is built per request, and a frozen dataclass's __init__ costs ~1 us more.
@dataclass(slots=True)
class InferCall:
    """One inference request, protocol-neutral: the front-end supplies how to read its input
    headers, decode its tensors (after the headers passed) and build a V2 gRPC request (for burst);
    ``decode_exact``, where it has one, decodes in one step inputs that fit the signature exactly
    and answers None for the rest, which then take the header check."""

    model: str
    version: str
    request_id: str
    outputs: Sequence[str]
    headers: Callable[[], Sequence[TensorHeader]]
    decode: Callable[[], dict[str, Array]]
    to_proto: Callable[[], pb.ModelInferRequest]
    # The request's tensor bytes as received; asked only when it failed (to hand a large one's heap back).
    nbytes: Callable[[], int] = lambda: 0
    decode_exact: Callable[[InputTable], dict[str, Array] | None] | None = None


@dataclass(slots=True)
class InferResult:
    """The answer: local outputs (``served`` is the version that ran them) or a burst response."""

    model: str
    version: str
    request_id: str
    served_by: str
    outputs: dict[str, Array] | None = None
    served: ServedModel | None = None
    response: pb.ModelInferResponse | None = None


class InferenceRouter:
    """Decides local or burst for each call; checks inputs before decoding them."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: AgentMetrics,
        settings: BurstSettings,
        limits: RequestLimits | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.limits = limits or RequestLimits()
        self.burst = BurstClient(settings) if settings.target else None
        if self.burst is not None:
            burst = self.burst
            metrics.watch_budget(lambda: burst.budget.snapshot())  # late-bound: the budget may be replaced
        self._bursts_in_a_row = 0  # approximate under concurrency, which is all a probe needs
        self._corrections: dict[str, LatencyCorrection] = {}
        self.trials: Trials | None = None  # canary/shadow hook, set by the agent

    def _route(self, served: ServedModel | None) -> tuple[str | None, float]:
        """(why this request should go to burst, or None to serve it locally; predicted local s)."""
        if self.burst is None:
            return None, 0.0
        why, wait = self._route_by_latency(served)
        # A spent burst budget (set to "serve locally") keeps the request here: queue, don't pay.
        if why is not None and self.burst is not None and self.burst.budget.hold_back():
            return None, wait
        return why, wait

    def _route_by_latency(self, served: ServedModel | None) -> tuple[str | None, float]:
        if self.burst is None:
            return None, 0.0
        if served is None:
            return "model not loaded here", 0.0
        if served.failing:
            return "local model is failing", 0.0
        wait = served.batcher.predicted_wait_s()
        # The estimate is refreshed only by local runs: after a run of bursts, an idle model gets
        # one request, so a spike that slowed a few runs cannot keep traffic away for good.
        if self._bursts_in_a_row >= PROBE_AFTER_BURSTS and served.batcher.idle:
            return None, wait
        expected = wait + self._correction(served.model.name).margin()
        limit = self.settings.slo_s * self.settings.headroom
        if expected > limit:
            return f"predicted local latency {expected * 1000:.1f} ms exceeds {limit * 1000:.0f} ms", wait
        return None, wait

    def _correction(self, name: str) -> LatencyCorrection:
        corr = self._corrections.get(name)
        if corr is None:
            corr = self._corrections.setdefault(name, LatencyCorrection())
        return corr

    def infer(self, call: InferCall) -> InferResult:
        """Serve one call locally or on the burst endpoint; InvalidInputError before any decoding
        when its inputs cannot fit the model served here."""
        start = time.perf_counter()
        served_by = LOCAL
        ok = False
        # Canary/shadow hook (edgectl.agent.canary): a call that names no version may go to a
        # candidate on trial; every local answer is shown to the trial after it is sent.
        trial_io: list[tuple[dict[str, Array], dict[str, Array]]] = []  # filled by _local
        pick = self.trials.pick(call.model, call.version) if self.trials is not None else call.version
        served = self.registry.resolve(call.model, pick)
        if served is None and pick != call.version:  # the trial's version went in a swap just now
            served = self.registry.resolve(call.model, call.version)
        tried_burst = False
        decode_ns: list[int] = []  # how long checking and decoding the inputs took, when they were
        feeds: dict[str, Array] | None = None
        try:
            if served is not None:
                t0 = time.perf_counter()
                feeds = call.decode_exact(served.inputs) if call.decode_exact is not None else None
                if feeds is None:
                    served.inputs.check(call.headers(), self.limits)  # refuses, saying why
                else:
                    decode_ns.append(int((time.perf_counter() - t0) * 1e9))
            why, predicted = self._route(served)
            if why is not None and self.burst is not None and self.burst.available():
                tried_burst = True
                try:
                    result = self._burst(call)
                    served_by = result.served_by
                    self._bursts_in_a_row += 1
                    ok = True
                    return result
                except (BurstUnavailableError, ModelNotFoundError) as exc:
                    log.info("burst failed, serving locally: %s", exc)
            self._bursts_in_a_row = 0
            result = self._local(call, served, feeds, decode_ns, trial_io)
            if self.burst is not None:
                self._correction(call.model).observe(predicted, time.perf_counter() - start)
            ok = True
            return result
        except (InferenceError, ModelUnavailableError, ModelNotFoundError) as exc:
            # The local side cannot serve it: burst is the last resort, when its circuit allows.
            if (
                self.burst is not None
                and not tried_burst
                and self.burst.available()
                and not isinstance(exc, InvalidInputError)
            ):
                result = self._burst(call)
                served_by = result.served_by
                ok = True
                return result
            raise
        finally:
            elapsed = time.perf_counter() - start
            if not ok and call.nbytes() >= TRIM_AFTER_BYTES:
                trim_heap()
            self.metrics.observe_request(call.model, served_by, ok, elapsed)
            if served is not None and served_by == LOCAL:
                served.stats.request(ok, int(elapsed * 1e9), decode_ns[0] if decode_ns else None)
                if self.trials is not None:  # canary/shadow hook
                    io = trial_io[0] if trial_io else (None, None)
                    self.trials.done(call.model, served, ok, elapsed, *io)

    def _local(
        self,
        call: InferCall,
        served: ServedModel | None,
        feeds: dict[str, Array] | None,
        decode_ns: list[int],
        trial_io: list[tuple[dict[str, Array], dict[str, Array]]] | None = None,
    ) -> InferResult:
        if served is None:
            self.registry.require(call.model, call.version)  # raises, saying what is served
            raise ModelNotFoundError(f"model {call.model!r} is not served here")
        served.batcher.arrive()
        try:
            if feeds is None:
                t0 = time.perf_counter()
                feeds = call.decode()
                decode_ns.append(int((time.perf_counter() - t0) * 1e9))
            if served.drift is not None:
                served.drift.observe(feeds)  # a bounded sample: a few us per request
            outputs, model = self.registry.infer(
                call.model, feeds, self.settings.local_timeout_s, version=call.version, arrived=served
            )
            if trial_io is not None and self.trials is not None:
                trial_io.append((feeds, outputs))
        finally:
            served.batcher.depart()
        unknown = [n for n in call.outputs if n not in outputs]
        if unknown:
            raise InvalidInputError(
                f"model {model.name!r} has no outputs {unknown}; it has {sorted(outputs)}"
            )
        picked = {n: outputs[n] for n in call.outputs} if call.outputs else outputs
        return InferResult(model.name, str(model.version), call.request_id, LOCAL, picked, served)

    def _burst(self, call: InferCall) -> InferResult:
        assert self.burst is not None
        response = self.burst.infer(call.to_proto())
        # A remote agent names itself "local": what matters to our caller is that we sent it away.
        response.parameters[SERVED_BY].string_param = self.burst.label
        return InferResult(
            response.model_name or call.model,
            response.model_version,
            call.request_id,
            self.burst.label,
            response=response,
        )

    def close(self) -> None:
        """Close the burst channel."""
        if self.burst is not None:
            self.burst.close()
