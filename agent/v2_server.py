"""The KServe Open Inference Protocol V2 over gRPC: a thin servicer over the router and registry.

It validates and converts at the codec seam, calls the domain objects, and maps the agent's
errors to gRPC status codes in one place (``_abort_for``), so stock clients (tritonclient,
KServe) see the codes and messages they expect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import edgectl
from edgectl.addresses import HostPort, parse_host_port
from edgectl.agent.codecs import decode_request, encode_response
from edgectl.agent.errors import (
    AgentError,
    BudgetExhaustedError,
    BurstUnavailableError,
    ConfigError,
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    NotServedError,
)
from edgectl.agent.input_check import request_headers
from edgectl.agent.router import SERVED_BY, InferCall, InferenceRouter
from edgectl.agent.serving import ModelRegistry
from edgectl.agent.tls import ServingSecurity
from edgectl.agent.v2_triton import (
    EXTENSIONS,
    SHARED_MEMORY_REGION,
    in_shared_memory,
    model_config,
    model_metadata,
    model_statistics,
    not_served,
    repository_index,
)
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "inference.GRPCInferenceService"

_CODES: list[tuple[type[AgentError], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BurstUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BudgetExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InferenceError, grpc.StatusCode.INTERNAL),
    (NotServedError, grpc.StatusCode.UNIMPLEMENTED),
]
# A stream request that asks for it gets this flag on its (only) response, as Triton sets it.
_FINAL_ASKED = "triton_enable_empty_final_response"
_FINAL = "triton_final_response"
# An open stream holds a server worker while it waits for its next request: streams are capped,
# and V2Server adds a worker per stream to its pool, so unary calls and health checks keep theirs.
MAX_STREAMS = 64


_NO_CLASSIFICATION = (
    "output {!r}: the classification extension is not served; request the output itself and take its top-k"
)


def _abort_for(context: grpc.ServicerContext, exc: AgentError) -> NoReturn:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            context.abort(code, str(exc))
    context.abort(grpc.StatusCode.INTERNAL, str(exc))
    raise AssertionError("context.abort always raises")  # for type checkers: abort is NoReturn


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService backed by a ModelRegistry and an InferenceRouter."""

    def __init__(
        self,
        registry: ModelRegistry,
        router: InferenceRouter,
        ready: Callable[[], bool] | None = None,
        *,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.registry = registry
        self.router = router
        self._ready = ready
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)

    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def is_ready(self) -> bool:
        """Ready to serve: a model is loaded (or what the agent says)."""
        return self._ready() if self._ready is not None else bool(self.registry.names())

    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.registry.resolve(request.name, request.version) is not None)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="edgectl-agent", version=edgectl.__version__, extensions=EXTENSIONS
        )

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            served = self.registry.require(request.name, request.version)
        except ModelNotFoundError as exc:
            _abort_for(context, exc)
        return model_metadata(self.registry, served)

    def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            served = self.registry.require(request.name, request.version)
        except ModelNotFoundError as exc:
            _abort_for(context, exc)
        return pb.ModelConfigResponse(config=model_config(served, self.registry.settings))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                self.registry.require(request.name, request.version)
        except ModelNotFoundError as exc:
            _abort_for(context, exc)
        return model_statistics(self.registry, request.name, request.version)

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return repository_index(self.registry, request.ready)

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return self._infer(request)
        except AgentError as exc:
            _abort_for(context, exc)

    def ModelStreamInfer(
        self, requests: Iterator[pb.ModelInferRequest], context: Any
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: one answer per request, in order; a failed request
        answers with its error message and the stream goes on."""
        if not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} ModelStreamInfer streams are open, the most this agent serves at "
                "once; close one, or send ModelInfer requests",
            )
        try:
            yield from self._stream(requests)
        finally:
            self._streams.release()

    def _stream(self, requests: Iterator[pb.ModelInferRequest]) -> Iterator[pb.ModelStreamInferResponse]:
        for request in requests:
            try:
                response = self._infer(request)
            except AgentError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))
                continue
            asked = request.parameters.get(_FINAL_ASKED)
            if asked is not None and asked.bool_param:
                response.parameters[_FINAL].bool_param = True
            yield pb.ModelStreamInferResponse(infer_response=response)

    def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        for i in request.inputs:
            if SHARED_MEMORY_REGION in i.parameters:
                raise in_shared_memory("input", i.name, i.parameters[SHARED_MEMORY_REGION].string_param)
        outputs = []
        for o in request.outputs:
            if "classification" in o.parameters:  # answering with the raw tensor would mislead
                raise InvalidInputError(_NO_CLASSIFICATION.format(o.name))
            if SHARED_MEMORY_REGION in o.parameters:
                raise in_shared_memory("output", o.name, o.parameters[SHARED_MEMORY_REGION].string_param)
            outputs.append(o.name)
        call = InferCall(
            model=request.model_name,
            version=request.model_version,
            request_id=request.id,
            outputs=outputs,
            headers=lambda: request_headers(request),
            decode=lambda: decode_request(request),
            to_proto=lambda: request,  # forwarded unchanged
            nbytes=lambda: sum(map(len, request.raw_input_contents)),
            decode_exact=lambda table: table.decode_exact(request),
        )
        result = self.router.infer(call)
        if result.response is not None:
            return result.response
        assert result.outputs is not None and result.served is not None
        start = time.perf_counter()
        response = encode_response(
            result.model, result.version, result.request_id, result.outputs, (), {SERVED_BY: result.served_by}
        )
        result.served.stats.output(int((time.perf_counter() - start) * 1e9))
        return response

    # Triton's extensions that are not served: UNIMPLEMENTED with what to do instead.
    def RepositoryModelLoad(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("model_repository"))

    def RepositoryModelUnload(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("model_repository"))

    def SystemSharedMemoryStatus(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("system_shared_memory"))

    def SystemSharedMemoryRegister(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("system_shared_memory"))

    def SystemSharedMemoryUnregister(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("system_shared_memory"))

    def CudaSharedMemoryStatus(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("cuda_shared_memory"))

    def CudaSharedMemoryRegister(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("cuda_shared_memory"))

    def CudaSharedMemoryUnregister(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("cuda_shared_memory"))

    def TraceSetting(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("trace"))

    def LogSettings(self, request: pb.UnservedRequest, context: Any) -> pb.UnservedResponse:
        _abort_for(context, not_served("logging"))


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 on the inference port: SERVING once a model is ready; a service name is
    a model name (or the V2 service's own name, which means the whole server)."""

    def __init__(self, ready: Callable[[], bool], registry: ModelRegistry) -> None:
        self._ready = ready
        self._registry = registry

    def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if request.service in ("", SERVICE_NAME):
            return status(status=status.SERVING if self._ready() else status.NOT_SERVING)
        if self._registry.get(request.service) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.service!r} is served here")
        return status(status=status.SERVING)


class V2Server:
    """A grpc.Server on ``listen`` serving the V2 protocol; ``port`` is the bound port."""

    def __init__(
        self,
        servicer: InferenceServicer,
        listen: str,
        max_workers: int = 128,
        security: ServingSecurity | None = None,
    ) -> None:
        # A sync gRPC worker is held for the whole request, so the workers bound the requests in
        # flight, and with them the batches the micro-batcher can form while one batch runs. Open
        # streams hold workers of their own, on top of ``max_workers``.
        workers = max_workers + servicer.max_streams
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="v2"),
            options=[
                # The request byte cap: gRPC refuses a longer message (RESOURCE_EXHAUSTED) from its
                # length prefix, before reading it.
                ("grpc.max_receive_message_length", servicer.router.limits.max_request_bytes),
                # Responses are not capped (as over HTTP, and as Triton sends them): a model may
                # answer an accepted request with more bytes than it took in.
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=security.grpc_interceptors() if security is not None else None,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(
            HealthServicer(servicer.is_ready, servicer.registry), self.server
        )
        try:
            creds = security.grpc_credentials() if security is not None else None
            self.port = (
                self.server.add_secure_port(listen, creds)
                if creds is not None
                else self.server.add_insecure_port(listen)
            )
        except RuntimeError as exc:  # newer grpcio raises instead of returning 0
            raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {listen}: address in use or invalid")
        self.address = str(HostPort(parse_host_port(listen, what="--listen", listen=True).host, self.port))

    def start(self) -> None:
        self.server.start()
        log.info("KServe V2 gRPC listening on %s", self.address)

    def stop(self, grace: float = 2.0) -> None:
        """Stop taking calls, cancel what is left after ``grace`` s; never wait past that much longer.

        A ModelStreamInfer call that a client opens with the wrong arity or junk bytes can leave
        grpc's server with a call it never finishes, and its shutdown event then never fires: the
        agent must still stop (and a swap or restart go on), so the wait is bounded."""
        if not self.server.stop(grace).wait(grace + 5.0):
            log.warning(
                "the V2 gRPC server did not finish its calls %.0f s after stopping; going on", grace + 5.0
            )
