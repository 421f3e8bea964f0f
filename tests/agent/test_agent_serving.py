"""Hot swap under load, micro-batching, burst with a circuit breaker, chunks over MQTT, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgectl.agent.agent import Agent
from edgectl.agent.batching import BatchSettings, MicroBatcher
from edgectl.agent.burst import CircuitBreaker, LatencyCorrection
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.router import PROBE_AFTER_BURSTS
from edgectl.agent.runtime import SessionSettings, load_model
from edgectl.agent.serving import ModelRegistry
from edgectl.ports import free_port, wait_for_port
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.artifact_server import MqttChunkResponder
from tests.agent.conftest import AgentRig, Bundles, V2Client, infer_overlapping, wait_for
from tests.agent.onnx_models import mlp_model, run_direct


def test_hot_swap_under_concurrent_load_fails_no_request(tmp_path: Path) -> None:
    paths = [mlp_model(tmp_path / f"m{i}.onnx", (16, 64, 4), seeds=[i, i + 10]) for i in range(4)]
    registry = ModelRegistry(BatchSettings(max_batch_size=4, max_queue_delay_s=0.001), AgentMetrics())

    def load(i: int):  # type: ignore[no-untyped-def]
        return load_model(
            paths[i], name="m", version=i + 1, digest=f"d{i}", settings=SessionSettings(intra_op_threads=1)
        )

    registry.install(load(0))
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    want = {i + 1: run_direct(p, {"x": x})["y"] for i, p in enumerate(paths)}
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[int] = set()

    def hammer() -> int:
        n = 0
        while not stop.is_set():
            try:
                y, model = registry.infer("m", {"x": x}, timeout=10)
                np.testing.assert_allclose(y["y"], want[model.version], rtol=1e-5, atol=1e-5)
                seen.add(model.version)
                n += 1
            except BaseException as exc:  # any failure is the test's failure
                errors.append(exc)
        return n

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(hammer) for _ in range(6)]
        for i in range(1, 4):
            wait_for(lambda v=i: v in seen, what=f"version {i} to serve")
            registry.install(load(i))
        wait_for(lambda: 4 in seen, what="version 4 to serve")
        stop.set()
        total = sum(f.result() for f in futures)
    registry.close()
    assert not errors, errors[:3]
    assert total > 50


def test_concurrent_single_requests_are_micro_batched(tmp_path: Path) -> None:
    path = mlp_model(tmp_path / "m.onnx", (32, 256, 8))
    metrics = AgentMetrics()
    registry = ModelRegistry(BatchSettings(max_batch_size=8, max_queue_delay_s=0.005), metrics)
    registry.install(
        load_model(path, name="m", version=1, digest="d", settings=SessionSettings(intra_op_threads=1))
    )
    infer_overlapping(registry, path)
    hist = metrics.registry.get_sample_value("edgectl_agent_batch_size_count", {"model": "m"})
    rows = metrics.registry.get_sample_value("edgectl_agent_batch_size_sum", {"model": "m"})
    assert rows == 64 and hist is not None and hist < 40, f"{hist} session runs for 64 requests"


def test_unbatched_model_runs_idle_requests_on_the_caller_and_queues_the_rest(tmp_path: Path) -> None:
    """Without batching, one session run at a time: an idle model runs the request on its caller's
    thread (no hop); concurrent requests queue for the worker, which runs them back to back."""
    path = mlp_model(tmp_path / "m.onnx", (64, 512, 8))
    model = load_model(path, name="m", version=1, digest="d", settings=SessionSettings(intra_op_threads=1))
    threads: list[str] = []
    running = [0]
    overlaps = [0]
    lock = threading.Lock()

    def run(feeds):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            overlaps[0] += running[0] > 1
            threads.append(threading.current_thread().name)
        try:
            return model.run(feeds)
        finally:
            with lock:
                running[0] -= 1

    batcher = MicroBatcher(run, BatchSettings(max_batch_size=1), batchable=True, name="m")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for _ in range(5):  # sequential: every request finds the model idle
        assert batcher.run_if_idle({"x": x}) is not None
    assert threads == ["MainThread"] * 5

    together = threading.Barrier(8)  # the 8 callers start each round together, so they overlap

    def infer(_: int) -> object:
        together.wait(10)
        got = batcher.run_if_idle({"x": x})
        return got if got is not None else batcher.submit({"x": x}).result(10)

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(infer, range(200)))
    batcher.close()
    want = run_direct(path, {"x": x})["y"]
    for out in outs:
        np.testing.assert_allclose(out["y"], want, rtol=1e-5, atol=1e-5)  # type: ignore[index]
    assert overlaps[0] == 0, "two session runs overlapped"
    assert threads.count("batcher-m") > 0, "concurrent requests never reached the worker"
    assert batcher.idle and batcher.queue_depth == 0


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    b = CircuitBreaker(failure_threshold=2, reset_after_s=0.05)
    assert b.allow()
    b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow()
    wait_for(lambda: b.state == "half-open", what="half-open")
    assert b.allow() and not b.allow()  # one trial at a time
    b.success()
    assert b.state == "closed" and b.allow()


def overload(edge: Agent) -> None:
    """Make the local queue too slow for the SLO: an SLO of 1 µs, below any real local run.

    Only the SLO changes; the burst target, timeouts and breaker stay the agent's own settings.
    """
    edge.router.settings = dataclasses.replace(edge.router.settings, slo_s=1e-6)


def test_burst_on_missing_or_overloaded_model_then_fail_back_and_breaker(
    tmp_path: Path, bundles: Bundles, make_agent
) -> None:  # type: ignore[no-untyped-def]
    art = bundles.build(version=1)
    cloud: Agent = make_agent(serve_only=True, model_dir=art.root, device_id="")
    edge: Agent = make_agent(
        serve_only=True, model_dir=art.root, device_id="", burst=cloud.address, slo_ms=1000.0
    )
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    want = run_direct(art.root / "model.onnx", {"x": x})["y"]
    client = V2Client(edge.address)
    y, served_by, _ = client.infer("mlp", x)
    assert served_by == "local"
    # The local model disappears (failing/unloaded): requests burst, outputs unchanged.
    local = edge.registry.get("mlp")
    assert local is not None
    edge.registry.remove("mlp")
    y, served_by, _ = client.infer("mlp", x)
    assert served_by == f"burst:{cloud.address}"
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # Local capacity returns: traffic fails back by itself.
    edge.registry.install(local.model)
    assert client.infer("mlp", x)[1] == "local"
    # Overload: a predicted wait above the SLO bursts (served locally above under the agent's SLO).
    overload(edge)
    assert client.infer("mlp", x)[1] == f"burst:{cloud.address}"
    # Burst endpoint down: the breaker opens and requests are served locally, never failed.
    cloud.stop()
    for _ in range(6):
        assert client.infer("mlp", x)[1] == "local"
    assert edge.router.burst is not None and edge.router.burst.breaker.state == "open"
    share = edge.metrics.stats().burst_share
    assert 0 < share < 1
    client.close()


def test_broker_only_site_fetches_chunks_over_mqtt(rig: AgentRig) -> None:
    v1 = rig.bundles.build(version=1, dims=(64, 512, 8))
    d1 = rig.server.add(v1.root)
    responder = MqttChunkResponder(rig.server, rig.broker.host, rig.broker.port)
    try:
        rig.agent(control_plane=None, transport="mqtt")
        rig.fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
        rig.fleet.wait_serving("mlp", d1)
        assert responder.requests and all(r.artifact_digest == d1 for r in responder.requests)
    finally:
        responder.close()


def test_cli_serve_only_and_infer(tmp_path: Path, bundles: Bundles, trust_file: Path) -> None:
    art = bundles.build(version=7)
    port = free_port()
    cli = "from edgectl.cli.agent import app; app()"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            cli,
            "run",
            "--serve-only",
            "--model-dir",
            str(art.root),
            "--trust",
            str(trust_file),
            "--listen",
            f"127.0.0.1:{port}",
            "--profile",
            "x86-cpu-avx2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for_port("127.0.0.1", port, 30)
        x = np.random.default_rng(9).standard_normal((3, 4)).astype(np.float32)
        np.savez(tmp_path / "x.npz", x=x)
        infer = (
            "import typer; from edgectl.cli.infer import infer; app = typer.Typer(); "
            "app.command()(infer); app()"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                infer,
                "--server",
                f"127.0.0.1:{port}",
                "--model",
                "mlp",
                "--input",
                str(tmp_path / "x.npz"),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["version"] == "7" and doc["served_by"] == "local"
        y = np.array(doc["outputs"]["y"]["data"], np.float32)
        np.testing.assert_allclose(
            y, run_direct(art.root / "model.onnx", {"x": x})["y"], rtol=1e-5, atol=1e-5
        )
    finally:
        proc.terminate()
        proc.wait(10)


def test_prometheus_metrics_endpoint_exports_serving_numbers(bundles: Bundles, make_agent) -> None:  # type: ignore[no-untyped-def]
    art = bundles.build(version=4)
    cloud: Agent = make_agent(serve_only=True, model_dir=art.root, device_id="")
    port = free_port()
    edge: Agent = make_agent(
        serve_only=True,
        model_dir=art.root,
        device_id="",
        burst=cloud.address,
        max_batch_size=4,
        metrics_listen=f"127.0.0.1:{port}",
    )
    client = V2Client(edge.address)
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    for _ in range(3):
        assert client.infer("mlp", x)[1] == "local"
    overload(edge)
    assert client.infer("mlp", x)[1] == f"burst:{cloud.address}"
    client.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("edgectl_agent_requests_total", model="mlp", served_by="local", outcome="ok") == 3
    burst_label = f"burst:{cloud.address}"
    assert value("edgectl_agent_requests_total", model="mlp", served_by=burst_label, outcome="ok") == 1
    assert value("edgectl_agent_request_latency_seconds_count", model="mlp") == 4
    assert value("edgectl_agent_batch_size_sum", model="mlp") == 6  # three local runs of 2 rows
    assert value("edgectl_agent_run_seconds_count", model="mlp") == 3
    assert ("edgectl_agent_queue_depth", (("model", "mlp"),)) in samples
    assert value("edgectl_agent_burst_requests_total", model="mlp") == 1
    assert value("edgectl_agent_burst_share") == 0.25
    assert value("edgectl_agent_active_version", model="mlp", digest=art.digest) == 4
    assert ("edgectl_agent_delta_saved_bytes_total", ()) in samples


def test_latency_correction_learns_how_far_local_latency_runs_past_the_prediction() -> None:
    corr = LatencyCorrection()
    corr.observe(0.010, 0.030)
    assert corr.margin() > 0.020  # few samples: mean + 4 deviations, on the safe side
    for _ in range(100):
        corr.observe(0.010, 0.030)  # every request took 20 ms longer than the queue model said
    assert 0.019 < corr.margin() < 0.021
    for i in range(LatencyCorrection.WINDOW + 16):  # then 4 % of requests ran 200 ms late
        corr.observe(0.010, 0.210 if i % 25 == 0 else 0.010)
    assert corr.margin() < 0.001


def test_an_idle_local_model_gets_a_probe_after_a_run_of_bursts(bundles: Bundles, make_agent) -> None:  # type: ignore[no-untyped-def]
    art = bundles.build(version=1)
    cloud: Agent = make_agent(serve_only=True, model_dir=art.root, device_id="")
    edge: Agent = make_agent(serve_only=True, model_dir=art.root, device_id="", burst=cloud.address)
    # Every prediction now exceeds the SLO, as after a spike that slowed the last local runs.
    edge.router.settings = dataclasses.replace(edge.router.settings, slo_s=-1.0)
    client = V2Client(edge.address)
    x = np.zeros((1, 4), np.float32)
    routes = [client.infer("mlp", x)[1] for _ in range(2 * PROBE_AFTER_BURSTS + 2)]
    client.close()
    burst = f"burst:{cloud.address}"
    want = ([burst] * PROBE_AFTER_BURSTS + ["local"]) * 2
    assert routes == want


def test_overlapping_requests_of_different_sequence_lengths_all_get_answers(tmp_path: Path) -> None:
    """A dynamic sequence axis: queued requests whose trailing shapes differ are batched apart, and
    taking one out of the queue never compares another's numpy inputs (that killed the worker)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgectl.agent.codecs import decode_response, encode_request
    from tests.agent.v2_harness import InProcessV2

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "seq.onnx"))
    served = InProcessV2(tmp_path / "seq.onnx", name="seq", batch=BatchSettings())
    errors: list[str] = []

    def caller(seed: int) -> int:
        rng, answered = np.random.default_rng(seed), 0
        for _ in range(30):
            x = rng.standard_normal((1, int(rng.integers(2, 12)), 4)).astype(np.float32)
            try:
                y = decode_response(served.stub.ModelInfer(encode_request("seq", {"x": x}), timeout=10))["y"]
            except Exception as exc:  # a hung or failed request is the failure
                errors.append(f"{type(exc).__name__}: {exc}")
                return answered
            np.testing.assert_allclose(y, 2 * x)
            answered += 1
        return answered

    try:
        with ThreadPoolExecutor(6) as pool:
            answered = sum(pool.map(caller, range(6)))
    finally:
        served.close()
    assert not errors, errors[:3]
    assert answered == 180
