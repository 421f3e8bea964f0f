"""Triton's extensions on the gRPC port (ModelConfig, ModelStatistics, RepositoryIndex) and
grpc.health.v1, against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgectl.agent.batching import BatchSettings
from edgectl.agent.codecs import encode_request
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import model_config_pb2 as mc
from tests.agent.onnx_models import mlp_model
from tests.agent.v2_harness import InProcessV2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessV2]:
    s = InProcessV2(
        mlp_model(tmp_path / "mlp.onnx", (4, 8, 3)),
        name="mlp",
        version=2,
        batch=BatchSettings(max_batch_size=8, max_queue_delay_s=0.002),
    )
    try:
        yield s
    finally:
        s.close()


def test_model_config_has_triton_shape(served: InProcessV2) -> None:
    config = served.stub.ModelConfig(pb.ModelConfigRequest(name="mlp")).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "mlp",
        "onnxruntime_onnx",
        "onnxruntime",
        8,
    )
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("y", mc.TYPE_FP32, [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelConfig(pb.ModelConfigRequest(name="mlp", version="7"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_statistics_count_requests_runs_and_failures(served: InProcessV2) -> None:
    for _ in range(3):
        served.stub.ModelInfer(encode_request("mlp", {"x": np.ones((2, 4), np.float32)}))
    stats = served.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp")).model_stats
    assert [(s.name, s.version) for s in stats] == [("mlp", "2")]
    s = stats[0]
    assert s.inference_count == 6 and s.execution_count == 3 and s.last_inference > 0
    inf = s.inference_stats
    assert inf.success.count == 3 and inf.success.ns > 0
    assert inf.compute_infer.count == 3 and inf.compute_infer.ns > 0
    assert inf.compute_input.count == 3 and inf.compute_output.count == 3
    assert [(b.batch_size, b.compute_infer.count) for b in s.batch_stats] == [(2, 3)]
    with pytest.raises(grpc.RpcError):
        served.stub.ModelInfer(encode_request("mlp", {"x": np.ones((2, 5), np.float32)}))
    failed = served.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp")).model_stats[0]
    assert failed.inference_stats.fail.count == 1 and failed.inference_stats.success.count == 3
    all_models = served.stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
    assert [m.name for m in all_models] == ["mlp"]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelStatistics(pb.ModelStatisticsRequest(name="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_repository_index_and_health(served: InProcessV2) -> None:
    index = served.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    assert [(m.name, m.version, m.state) for m in index] == [("mlp", "2", "READY")]
    health = health_pb2_grpc.HealthStub(served.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest()).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service="mlp")).status == serving
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    served.registry.remove("mlp")  # nothing served: a probe must say so
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
