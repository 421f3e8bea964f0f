"""The KServe V2 gRPC server over real onnxruntime sessions, checked with our stubs and tritonclient."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgectl.agent.batching import BatchSettings
from edgectl.agent.codecs import decode_response, encode_request, response_parameters
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from tests.agent.onnx_models import mlp_model, run_direct
from tests.agent.v2_harness import InProcessV2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessV2]:
    model = mlp_model(tmp_path / "mlp.onnx", (4, 16, 3), seeds=[1, 2])
    s = InProcessV2(
        model, name="mlp", version=3, batch=BatchSettings(max_batch_size=8, max_queue_delay_s=0.002)
    )
    try:
        yield s
    finally:
        s.close()


def test_health_and_metadata(served: InProcessV2) -> None:
    assert served.stub.ServerLive(pb.ServerLiveRequest()).live
    assert served.stub.ServerReady(pb.ServerReadyRequest()).ready
    assert served.stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready
    assert served.stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="3")).ready
    assert not served.stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="2")).ready
    assert not served.stub.ModelReady(pb.ModelReadyRequest(name="other")).ready
    meta = served.stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
    assert meta.versions == ["3"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 3])]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("typed", [False, True])
def test_infer_raw_and_typed_contents_match_direct_onnxruntime(served: InProcessV2, typed: bool) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    response = served.stub.ModelInfer(encode_request("mlp", {"x": x}, typed=typed, request_id="r1"))
    assert response.id == "r1"
    assert response.model_version == "3"
    assert response_parameters(response)["served_by"] == "local"
    got = decode_response(response)["y"]
    np.testing.assert_allclose(got, run_direct(served.model_path, {"x": x})["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (encode_request("mlp", {"z": np.zeros((1, 4), np.float32)}), "takes inputs ['x']"),
        (encode_request("mlp", {"x": np.zeros((1, 4), np.float64)}), "must be float32"),
        (encode_request("mlp", {"x": np.zeros((1, 5), np.float32)}), "shape [-1, 4]"),
        (encode_request("mlp", {"x": np.zeros((4,), np.float32)}), "shape [-1, 4]"),
    ],
)
def test_invalid_inputs_are_invalid_argument_saying_what_was_expected(
    served: InProcessV2, request_: pb.ModelInferRequest, needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


def test_raw_size_mismatch_and_unknown_model(served: InProcessV2) -> None:
    req = encode_request("mlp", {"x": np.zeros((2, 4), np.float32)})
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 32" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(encode_request("ghost", {"x": np.zeros((1, 4), np.float32)}))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


TRITON_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    url, n = sys.argv[1], int(sys.argv[2])
    client = tc.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp", as_json=True)
    out = {"meta": meta, "results": []}
    for i in range(n):
        x = np.random.default_rng(i).standard_normal((i + 1, 4)).astype(np.float32)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("mlp", [inp], outputs=[tc.InferRequestedOutput("y")])
        params = res.get_response().parameters
        out["results"].append({"y": res.as_numpy("y").tolist(),
                               "served_by": params["served_by"].string_param})
    print(json.dumps(out))
    """
)


def test_stock_tritonclient_in_a_child_process_gets_direct_onnxruntime_outputs(served: InProcessV2) -> None:
    # tritonclient registers the same inference.* protobuf names as ours: one per process.
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CHILD, served.server.address, "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["meta"]["name"] == "mlp"
    for i, result in enumerate(out["results"]):
        x = np.random.default_rng(i).standard_normal((i + 1, 4)).astype(np.float32)
        want = run_direct(served.model_path, {"x": x})["y"]
        np.testing.assert_allclose(np.array(result["y"], np.float32), want, rtol=1e-6, atol=1e-6)
        assert result["served_by"] == "local"
