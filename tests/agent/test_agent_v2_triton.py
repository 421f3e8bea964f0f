"""Triton's extensions on the gRPC port (ModelConfig, ModelStatistics, RepositoryIndex) and
grpc.health.v1, against a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgectl.agent.batching import BatchSettings
from edgectl.agent.codecs import decode_response, encode_request
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import model_config_pb2 as mc
from tests.agent.onnx_models import mlp_model, run_direct
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
        1024,  # the rows one request may carry; the micro-batch is the preferred size below
    )
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("y", mc.TYPE_FP32, [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
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


def _stats(served: InProcessV2) -> pb.ModelStatistics:
    return served.stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp")).model_stats[0]


def test_a_lone_caller_runs_inline_and_overlapping_callers_share_runs(tmp_path: Path) -> None:
    """Told apart by ModelStatistics, not by timing: a sequential caller's requests each run alone,
    never queued (the inline path on the gRPC thread), even with a long batching delay; requests
    that arrive while the model is busy are queued and batched."""
    dim = 512
    path = mlp_model(tmp_path / "mlp.onnx", (dim, 4096, 3))
    # 512 rows admitted in one request: the long request below keeps the model busy.
    served = InProcessV2(path, name="mlp", batch=BatchSettings(max_batch_size=512, max_queue_delay_s=0.05))
    try:
        for i in range(20):
            x = np.full((1, dim), i / 20, np.float32)
            got = decode_response(served.stub.ModelInfer(encode_request("mlp", {"x": x})))["y"]
            np.testing.assert_allclose(got, run_direct(path, {"x": x})["y"], rtol=1e-4, atol=1e-4)
        lone = _stats(served)
        assert [(b.batch_size, b.compute_infer.count) for b in lone.batch_stats] == [(1, 20)]
        assert (lone.inference_stats.queue.count, lone.inference_stats.queue.ns) == (20, 0)
        assert lone.inference_stats.compute_input.count == 20  # decoded in the one-pass path

        # Keep the model busy with one long request (512 rows), then send single-row requests:
        # they find it running, queue, and leave the queue in batches.
        busy = served.stub.ModelInfer.future(encode_request("mlp", {"x": np.ones((512, dim), np.float32)}))
        batcher = served.registry.get("mlp").batcher  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while batcher.idle and not busy.done() and time.monotonic() < deadline:
            time.sleep(0.0005)
        n = 64
        xs = [np.random.default_rng(i).standard_normal((1, dim)).astype(np.float32) for i in range(n)]
        requests = [encode_request("mlp", {"x": x}) for x in xs]
        pending = [served.stub.ModelInfer.future(r, timeout=60) for r in requests]
        busy.result(60)
        for x, call in zip(xs, pending, strict=True):
            y = decode_response(call.result())["y"]
            np.testing.assert_allclose(y, run_direct(path, {"x": x})["y"], rtol=1e-4, atol=1e-4)
        both = _stats(served)
        singles = [(b.batch_size, b.compute_infer.count) for b in both.batch_stats if b.batch_size < 512]
        assert sum(size * runs for size, runs in singles) == 20 + n
        assert max(size for size, _ in singles) > 1, f"no batch formed: {singles}"
        assert both.inference_stats.queue.ns > 0  # batched requests waited in the queue
    finally:
        served.close()
