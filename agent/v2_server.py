"""The KServe Open Inference Protocol V2 over gRPC: a thin servicer over the router and registry.

It validates and converts at the codec seam, calls the domain objects, and maps the agent's
errors to gRPC status codes in one place (``_abort_for``), so stock clients (tritonclient,
KServe) see the codes and messages they expect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn

import grpc

import edgectl
from edgectl.addresses import HostPort, parse_host_port
from edgectl.agent.burst import InferenceRouter
from edgectl.agent.codecs import decode_request, v2_datatype
from edgectl.agent.errors import (
    AgentError,
    BurstUnavailableError,
    ConfigError,
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from edgectl.agent.serving import ModelRegistry
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 20
_CODES: list[tuple[type[AgentError], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BurstUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InferenceError, grpc.StatusCode.INTERNAL),
]


def _abort_for(context: grpc.ServicerContext, exc: AgentError) -> NoReturn:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            context.abort(code, str(exc))
    context.abort(grpc.StatusCode.INTERNAL, str(exc))
    raise AssertionError("context.abort always raises")  # for type checkers: abort is NoReturn


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService backed by a ModelRegistry and an InferenceRouter."""

    def __init__(
        self, registry: ModelRegistry, router: InferenceRouter, ready: Callable[[], bool] | None = None
    ) -> None:
        self.registry = registry
        self.router = router
        self._ready = ready

    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        ready = self._ready() if self._ready is not None else bool(self.registry.names())
        return pb.ServerReadyResponse(ready=ready)

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        served = self.registry.get(request.name)
        ok = served is not None and (not request.version or request.version == str(served.model.version))
        return pb.ModelReadyResponse(ready=ok)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="edgectl-agent", version=edgectl.__version__, extensions=[])

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            model = self.registry.require(request.name).model
        except ModelNotFoundError as exc:
            _abort_for(context, exc)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.version)],
            platform="onnxruntime_onnx",
            inputs=[
                tm(name=t.name, datatype=v2_datatype(t.dtype), shape=t.wire_shape()) for t in model.inputs
            ],
            outputs=[
                tm(name=t.name, datatype=v2_datatype(t.dtype), shape=t.wire_shape()) for t in model.outputs
            ],
        )

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            try:
                feeds = decode_request(request)
            except InvalidInputError:
                if self.registry.get(request.model_name) is not None or self.router.burst is None:
                    raise
                feeds = None  # not served here: let the burst endpoint judge the request
            return self.router.infer(request, feeds)
        except AgentError as exc:
            _abort_for(context, exc)


class V2Server:
    """A grpc.Server on ``listen`` serving the V2 protocol; ``port`` is the bound port."""

    def __init__(self, servicer: InferenceServicer, listen: str, max_workers: int = 128) -> None:
        # A sync gRPC worker is held for the whole request, so the workers bound the requests in
        # flight, and with them the batches the micro-batcher can form while one batch runs.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="v2"),
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)
        try:
            self.port = self.server.add_insecure_port(listen)
        except RuntimeError as exc:  # newer grpcio raises instead of returning 0
            raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {listen}: address in use or invalid")
        self.address = str(HostPort(parse_host_port(listen, what="--listen", listen=True).host, self.port))

    def start(self) -> None:
        self.server.start()
        log.info("KServe V2 gRPC listening on %s", self.address)

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
