"""An in-process agent serving stack on one ONNX model: registry, router and real V2 gRPC (and HTTP) servers.

Shared by the V2 server tests and ``benchmarks/bench_agent.py``; the agent itself wires the same
parts in ``edgectl.agent.agent``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from edgectl.agent.batching import BatchSettings
from edgectl.agent.burst import BurstCost, BurstSettings
from edgectl.agent.http_server import HttpV2Server
from edgectl.agent.input_check import RequestLimits
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.router import InferenceRouter
from edgectl.agent.runtime import SessionSettings, load_model
from edgectl.agent.serving import ModelRegistry
from edgectl.agent.v2_server import InferenceServicer, V2Server
from edgectl.artifact import DriftSummary
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc


class InProcessV2:
    """Serves ``model_path`` as ``name`` on 127.0.0.1 (a free port); ``stub`` is a client on it."""

    def __init__(
        self,
        model_path: Path,
        *,
        name: str = "m",
        version: int = 1,
        batch: BatchSettings | None = None,
        burst: str | None = None,
        slo_s: float = 0.1,
        limits: RequestLimits | None = None,
        http: bool = False,
        keep_versions: int = 1,
        input_summary: DriftSummary | None = None,
        cost: BurstCost | None = None,
    ) -> None:
        self.model_path = model_path
        self.metrics = AgentMetrics()
        self.registry = ModelRegistry(batch or BatchSettings(), self.metrics, keep_versions=keep_versions)
        model = load_model(
            model_path,
            name=name,
            version=version,
            digest="sha256:" + "0" * 64,
            settings=SessionSettings(intra_op_threads=1),
        )
        model.input_summary = input_summary  # what an artifact's input_summary.json would carry
        self.registry.install(model)
        self.router = InferenceRouter(
            self.registry,
            self.metrics,
            BurstSettings(target=burst, slo_s=slo_s, cost=cost or BurstCost()),
            limits,
        )
        self.server = V2Server(InferenceServicer(self.registry, self.router), "127.0.0.1:0")
        self.server.start()
        self.http = HttpV2Server(self.registry, self.router, "127.0.0.1:0") if http else None
        if self.http is not None:
            self.http.start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def url(self) -> str:
        """http://HOST:PORT of the HTTP server (``http=True``)."""
        assert self.http is not None
        return f"http://{self.http.address}"

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.channel.close()
        self.server.stop(0)
        self.router.close()
        self.registry.close()
