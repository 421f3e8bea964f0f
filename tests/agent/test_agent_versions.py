"""Several versions of one model name live: addressed by number or by default (the newest), all
in the repository index, and a swap that never fails a request, over gRPC and HTTP."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from edgectl.agent.batching import BatchSettings
from edgectl.agent.codecs import decode_response, encode_request
from edgectl.agent.runtime import SessionSettings, load_model
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.conftest import wait_for
from tests.agent.onnx_models import mlp_model, run_direct
from tests.agent.v2_harness import InProcessV2

X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)


def _load(path: Path, version: int):  # type: ignore[no-untyped-def]
    return load_model(
        path,
        name="m",
        version=version,
        digest=f"sha256:{version:064d}",
        settings=SessionSettings(intra_op_threads=1),
    )


def test_two_versions_live_addressed_explicitly_and_by_default(tmp_path: Path) -> None:
    v1 = mlp_model(tmp_path / "v1.onnx", (4, 8, 3), seeds=[1, 2])
    v2 = mlp_model(tmp_path / "v2.onnx", (4, 8, 3), seeds=[3, 4])
    served = InProcessV2(v1, version=1, keep_versions=2, http=True, batch=BatchSettings())
    try:
        served.registry.install(_load(v2, 2))
        want1, want2 = run_direct(v1, {"x": X})["y"], run_direct(v2, {"x": X})["y"]

        def grpc_infer(version: str) -> tuple[str, np.ndarray]:
            req = encode_request("m", {"x": X})
            req.model_version = version
            resp = served.stub.ModelInfer(req)
            return resp.model_version, decode_response(resp)["y"]

        for version, (got_version, y) in (
            ("", grpc_infer("")),
            ("1", grpc_infer("1")),
            ("2", grpc_infer("2")),
        ):
            want = want1 if got_version == "1" else want2
            assert got_version == (version or "2")
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        meta = served.stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))
        assert list(meta.versions) == ["1", "2"]
        index = served.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        assert [(m.name, m.version, m.state) for m in index] == [("m", "1", "READY"), ("m", "2", "READY")]
        assert served.stub.ModelReady(pb.ModelReadyRequest(name="m", version="1")).ready
        doc = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
        req = urllib.request.Request(
            f"{served.url}/v2/models/m/versions/1/infer", data=json.dumps(doc).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            out = json.loads(resp.read())
        assert out["model_version"] == "1"
        np.testing.assert_allclose(
            np.array(out["outputs"][0]["data"]).reshape(2, 3), want1, rtol=1e-5, atol=1e-5
        )
        # A third version pushes the oldest out: two stay live.
        served.registry.install(_load(v1, 3))
        assert [m.version for m in served.registry.versions("m")] == ["2", "3"]
        req1 = encode_request("m", {"x": X})
        req1.model_version = "1"
        try:
            served.stub.ModelInfer(req1)
            raise AssertionError("version 1 should be gone")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND and "serving versions 2, 3" in (
                err.details() or ""
            )
    finally:
        served.close()


def test_swaps_under_concurrent_requests_fail_none(tmp_path: Path) -> None:
    paths = [mlp_model(tmp_path / f"v{i}.onnx", (4, 32, 3), seeds=[i, i + 10]) for i in (1, 2)]
    served = InProcessV2(paths[0], version=1, keep_versions=2, batch=BatchSettings(max_queue_delay_s=0.001))
    wants = {str(i + 1): run_direct(p, {"x": X})["y"] for i, p in enumerate(paths)}
    stop = threading.Event()
    failures: list[str] = []
    counts = [0]

    def client(version: str) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.server.address))
        while not stop.is_set():
            req = encode_request("m", {"x": X})
            req.model_version = version
            try:
                resp = stub.ModelInfer(req, timeout=10)
            except grpc.RpcError as err:
                failures.append(f"{version or 'default'}: {err.code().name} {err.details()}")
                continue
            got = decode_response(resp)["y"]
            want = wants["1" if int(resp.model_version) % 2 else "2"]
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                failures.append(f"version {resp.model_version} answered with another version's outputs")
            counts[0] += 1

    threads = [threading.Thread(target=client, args=("",)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 12):  # ten swaps while four clients hammer the default version
            served.registry.install(_load(paths[(v - 1) % 2], v))
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        served.close()
    assert not failures, failures[:5]
    assert counts[0] > 20


def test_a_version_finishing_its_queue_after_a_swap_is_listed_unavailable(tmp_path: Path) -> None:
    v1 = mlp_model(tmp_path / "v1.onnx", (4, 8, 3), seeds=[1, 2])
    served = InProcessV2(v1, version=1, http=True, batch=BatchSettings())
    try:
        old = _load(v1, 5)
        gate = threading.Event()
        run = old.run
        old.run = lambda feeds: (gate.wait(10), run(feeds))[1]  # type: ignore[method-assign]
        served.registry.install(old)
        out: list[np.ndarray] = []
        caller = threading.Thread(target=lambda: out.append(served.registry.infer("m", {"x": X}, 10)[0]["y"]))
        caller.start()
        wait_for(lambda: not served.registry.resolve("m").batcher.idle, what="the request to start")  # type: ignore[union-attr]
        served.registry.install(_load(v1, 6))  # version 5 drains its request in the background
        index = served.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        assert [(m.version, m.state) for m in index] == [("6", "READY"), ("5", "UNAVAILABLE")]
        assert "finishing the requests" in index[1].reason
        ready = served.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        assert [m.version for m in ready] == ["6"]
        req = urllib.request.Request(
            f"{served.url}/v2/repository/index", data=b'{"ready": true}', method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert [m["version"] for m in json.loads(resp.read())] == ["6"]
        gate.set()
        caller.join(10)
        np.testing.assert_allclose(out[0], run_direct(v1, {"x": X})["y"], rtol=1e-5, atol=1e-5)  # not failed
        wait_for(
            lambda: len(served.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models) == 1, what="drained"
        )
    finally:
        served.close()
