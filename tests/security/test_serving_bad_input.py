"""Resource exhaustion through the V2 data path (security issue row 4): oversized and mistyped
requests against a real agent, over gRPC and HTTP, are refused from their headers and the agent
keeps serving (positive control after each). The RSS bound is measured by
``benchmarks/bench_serving.py --only rss`` (an agent process; the test process would count the
client's own buffers)."""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from edgectl.agent.agent import Agent
from edgectl.agent.codecs import decode_response, encode_request
from edgectl.agent.http_codec import HEADER_LENGTH
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.conftest import Bundles
from tests.agent.onnx_models import run_direct

X = np.ones((2, 4), np.float32)
BIG = 128 << 20


def _bytes_flood() -> pb.ModelInferRequest:
    """60 MiB of empty BYTES elements: 15.7 M Python objects if decoded before checking."""
    count = (60 << 20) // 4
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="BYTES", shape=[count // 4, 4])
    req.raw_input_contents.append(struct.pack("<I", 0) * count)
    return req


def _wrong_dtype() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP64", shape=[(64 << 20) // 32, 4])
    req.raw_input_contents.append(bytes(64 << 20))
    return req


def _huge_shape() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=[10**12, 4])
    req.raw_input_contents.append(bytes(32))
    return req


@pytest.mark.parametrize(
    ("what", "make", "needle"),
    [
        # The refusal names the wire datatype: it came from the headers, before any decoding
        # (decoding first turned the BYTES into 15.7 M objects and then said "got object").
        ("60 MiB BYTES for a float model", _bytes_flood, "must be float32 (V2 FP32), got BYTES"),
        ("64 MiB of the wrong dtype", _wrong_dtype, "must be float32 (V2 FP32), got FP64"),
        ("10^12 elements declared", _huge_shape, "batch-size must be <= 1024"),
    ],
)
def test_oversized_v2_requests_are_refused_and_the_agent_keeps_serving(
    what: str,
    make: Callable[[], pb.ModelInferRequest],
    needle: str,
    bundles: Bundles,
    make_agent: Callable[..., Agent],
) -> None:
    art = bundles.build()
    # A cap above the requests' size, so they reach the signature check rather than gRPC's limit.
    agent = make_agent(serve_only=True, model_dir=art.root, device_id="", max_request_mib=96)
    channel = grpc.insecure_channel(
        agent.address,
        options=[("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)],
    )
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(make(), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in (err.value.details() or "")
    got = decode_response(stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10))["y"]
    np.testing.assert_allclose(got, run_direct(art.root / "model.onnx", {"x": X})["y"], rtol=1e-5, atol=1e-5)
    channel.close()


def test_requests_over_the_cap_are_refused_before_they_are_read(
    bundles: Bundles, make_agent: Callable[..., Agent]
) -> None:
    art = bundles.build()
    agent = make_agent(
        serve_only=True, model_dir=art.root, device_id="", http_listen="127.0.0.1:0", max_request_mib=16
    )
    assert agent.http is not None
    channel = grpc.insecure_channel(agent.address, options=[("grpc.max_send_message_length", BIG)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    big = encode_request("mlp", {"x": np.zeros(((17 << 20) // 16, 4), np.float32)})
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(big, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # HTTP: a body over the cap is 413; a JSON part over its own 8 MiB cap (under the body cap) is 400.
    body = b"{}" + bytes(17 << 20)
    req = urllib.request.Request(
        f"http://{agent.http.address}/v2/models/mlp/infer",
        data=body,
        headers={HEADER_LENGTH: "2"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=60)
    assert http_err.value.code == 413
    doc = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}],
            "pad": "x" * (9 << 20),
        }
    )
    req = urllib.request.Request(
        f"http://{agent.http.address}/v2/models/mlp/infer", data=doc.encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=60)
    assert http_err.value.code == 400
    assert "send large tensors as binary data" in json.loads(http_err.value.read())["error"]
    # Positive control on both listeners.
    assert stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10).outputs
    ok = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    )
    req = urllib.request.Request(
        f"http://{agent.http.address}/v2/models/mlp/infer", data=ok.encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    channel.close()
