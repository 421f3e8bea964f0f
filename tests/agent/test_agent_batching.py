"""Batching never taxes a lone caller: an idle model answers at once, and concurrent callers
still share session runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from edgectl.agent.batching import BatchSettings
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.runtime import SessionSettings, load_model
from edgectl.agent.serving import ModelRegistry
from tests.agent.conftest import infer_overlapping
from tests.agent.onnx_models import mlp_model, run_direct

DELAY_S = 0.05  # long enough that waiting for a batch would show in every round trip


def _registry(tmp_path: Path) -> tuple[ModelRegistry, AgentMetrics, Path]:
    path = mlp_model(tmp_path / "m.onnx", (32, 256, 8))
    metrics = AgentMetrics()
    registry = ModelRegistry(BatchSettings(max_batch_size=8, max_queue_delay_s=DELAY_S), metrics)
    model = load_model(path, name="m", version=1, digest="d", settings=SessionSettings(intra_op_threads=1))
    registry.install(model)
    return registry, metrics, path


def test_a_lone_sequential_caller_never_waits_for_a_batch(tmp_path: Path) -> None:
    registry, metrics, path = _registry(tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    seen: list[str] = []
    served = registry.get("m")
    assert served is not None
    run = served.batcher._run
    served.batcher._run = lambda feeds: (seen.append(threading.current_thread().name), run(feeds))[1]  # type: ignore[method-assign]
    start = time.perf_counter()
    for _ in range(20):
        y, _ = registry.infer("m", {"x": x}, timeout=10)
    per_request = (time.perf_counter() - start) / 20
    registry.close()
    np.testing.assert_allclose(y["y"], run_direct(path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    assert per_request < DELAY_S / 2, f"{per_request * 1000:.1f} ms a request: it waited for a batch"
    assert set(seen) == {"MainThread"}, "a lone caller's request took a thread hop"
    runs = metrics.registry.get_sample_value("edgectl_agent_batch_size_count", {"model": "m"})
    assert runs == 20


def test_overlapping_callers_are_still_batched(tmp_path: Path) -> None:
    registry, metrics, path = _registry(tmp_path)
    infer_overlapping(registry, path)
    runs = metrics.registry.get_sample_value("edgectl_agent_batch_size_count", {"model": "m"})
    assert runs is not None and runs < 40, f"{runs} session runs for 64 requests"
