"""Malformed V2 requests are refused from their headers, before any tensor is decoded or
allocated, with the proper status; the server keeps serving (issue: V2 resource exhaustion)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgectl.agent.batching import BatchSettings
from edgectl.agent.codecs import decode_response, encode_request
from edgectl.agent.input_check import InputTable, RequestLimits
from edgectl.artifact import TensorSpec
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from tests.agent.onnx_models import mlp_model, run_direct, string_model
from tests.agent.v2_harness import InProcessV2

X = np.ones((2, 4), np.float32)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessV2]:
    s = InProcessV2(mlp_model(tmp_path / "mlp.onnx", (4, 8, 3)), name="mlp", batch=BatchSettings())
    try:
        yield s
    finally:
        s.close()


def _req(**kw: object) -> pb.ModelInferRequest:
    return encode_request("mlp", {"x": X}) if not kw else encode_request("mlp", kw)  # type: ignore[arg-type]


def _declared(shape: list[int], datatype: str = "FP32", raw: bytes = b"\0" * 32) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    return req


def _bytes_tensor(count: int, shape: list[int]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="BYTES", shape=shape)
    req.raw_input_contents.append(struct.pack("<I", 0) * count)
    return req


def _typed_short() -> pb.ModelInferRequest:
    req = encode_request("mlp", {"x": X}, typed=True)
    del req.inputs[0].contents.fp32_contents[-1]
    return req


def _raw_and_typed() -> pb.ModelInferRequest:
    req = encode_request("mlp", {"x": X})
    req.inputs[0].contents.fp32_contents.append(1.0)
    return req


def _two_raw_for_one_input() -> pb.ModelInferRequest:
    req = encode_request("mlp", {"x": X})
    req.raw_input_contents.append(b"")
    return req


def _duplicate() -> pb.ModelInferRequest:
    req = encode_request("mlp", {"x": X})
    req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.append(req.raw_input_contents[0])
    return req


CASES: list[tuple[str, Callable[[], pb.ModelInferRequest], grpc.StatusCode, str]] = [
    ("wrong dtype", lambda: _req(x=X.astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "must be float32"),
    ("unknown input", lambda: _req(z=X), grpc.StatusCode.INVALID_ARGUMENT, "takes inputs ['x']"),
    ("wrong trailing dim", lambda: _req(x=np.ones((2, 5), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "[-1, 4]"),
    ("wrong rank", lambda: _req(x=np.ones((8,), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "[-1, 4]"),
    ("raw bytes short of the shape", lambda: _declared([2, 4], raw=b"\0" * 28), grpc.StatusCode.INVALID_ARGUMENT, "expected 32"),
    ("10^12 elements declared", lambda: _declared([250_000_000_000, 4]), grpc.StatusCode.INVALID_ARGUMENT, "batch-size must be <= 1024"),
    ("negative dim", lambda: _declared([-2, 4]), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    ("unknown datatype", lambda: _declared([2, 4], datatype="FP8"), grpc.StatusCode.INVALID_ARGUMENT, "got FP8"),
    ("BYTES to a float model", lambda: _bytes_tensor(8, [2, 4]), grpc.StatusCode.INVALID_ARGUMENT, "must be float32"),
    ("typed contents short", _typed_short, grpc.StatusCode.INVALID_ARGUMENT, "7 values, expected 8"),
    ("raw and typed contents", _raw_and_typed, grpc.StatusCode.INVALID_ARGUMENT, "both raw and typed"),
    ("raw contents count", _two_raw_for_one_input, grpc.StatusCode.INVALID_ARGUMENT, "one per input"),
    ("input twice", _duplicate, grpc.StatusCode.INVALID_ARGUMENT, "appears twice"),
    ("unknown model", lambda: encode_request("ghost", {"x": X}), grpc.StatusCode.NOT_FOUND, "not served here"),
    ("unknown version", lambda: pb.ModelInferRequest(model_name="mlp", model_version="9"), grpc.StatusCode.NOT_FOUND, "version 9"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "make", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_refused_with_its_status_and_the_server_keeps_serving(
    served: InProcessV2,
    what: str,
    make: Callable[[], pb.ModelInferRequest],
    code: grpc.StatusCode,
    needle: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(make())
    assert err.value.code() == code, err.value.details()
    assert needle in (err.value.details() or ""), err.value.details()
    # Positive control: the same server answers a good request right after.
    got = decode_response(served.stub.ModelInfer(encode_request("mlp", {"x": X})))["y"]
    np.testing.assert_allclose(got, run_direct(served.model_path, {"x": X})["y"], rtol=1e-5, atol=1e-5)


def test_request_over_the_byte_cap_is_resource_exhausted(served: InProcessV2) -> None:
    big = np.zeros((65 << 20) // 4, np.float32).reshape(-1, 4)  # 65 MiB, over the default 64 MiB cap
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ModelInfer(encode_request("mlp", {"x": big}))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.stub.ServerLive(pb.ServerLiveRequest()).live


@pytest.fixture
def strings(tmp_path: Path) -> Iterator[InProcessV2]:
    s = InProcessV2(
        string_model(tmp_path / "s.onnx"),
        name="s",
        limits=RequestLimits(max_bytes_elements=1000),
        # Batches this large are admitted, so the element cap is what refuses the flood below.
        batch=BatchSettings(max_batch_size=1 << 20),
    )
    try:
        yield s
    finally:
        s.close()


def test_bytes_tensors_round_trip_and_their_element_count_is_capped(strings: InProcessV2) -> None:
    words = np.array([b"edge", b"", "grüße".encode()], dtype=np.object_)
    got = decode_response(strings.stub.ModelInfer(encode_request("s", {"s": words})))["t"]
    assert [bytes(v) for v in got] == [b"edge", b"", "grüße".encode()]
    with pytest.raises(grpc.RpcError) as err:  # the model holds text: bytes that are not UTF-8 are refused
        strings.stub.ModelInfer(encode_request("s", {"s": np.array([b"\xff"], dtype=np.object_)}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in (err.value.details() or "")
    # 2 MB of empty elements: refused from the header, not turned into 500k Python objects.
    req = pb.ModelInferRequest(model_name="s")
    req.inputs.add(name="s", datatype="BYTES", shape=[500_000])
    req.raw_input_contents.append(struct.pack("<I", 0) * 500_000)
    with pytest.raises(grpc.RpcError) as err:
        strings.stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 1000" in (err.value.details() or "")
    # More elements in the data than the shape declares: refused, not decoded past the count.
    req = pb.ModelInferRequest(model_name="s")
    req.inputs.add(name="s", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(struct.pack("<I", 0) * 900)
    with pytest.raises(grpc.RpcError) as err:
        strings.stub.ModelInfer(req)
    assert "exactly 2 elements" in (err.value.details() or "")


REFUSED = [c for c in CASES if c[2] == grpc.StatusCode.INVALID_ARGUMENT]


@pytest.mark.parametrize(("what", "make"), [(c[0], c[1]) for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_the_one_pass_decoder_declines_every_malformed_request(
    what: str, make: Callable[[], pb.ModelInferRequest]
) -> None:
    """The gRPC fast path (check and view in one pass) accepts only exact fits: everything else
    goes to the header check, which refuses with the reason the test above reads."""
    table = InputTable("mlp", (TensorSpec("x", "float32", ("batch", 4)),))
    assert table.decode_exact(make()) is None


def test_the_one_pass_decoder_views_exact_fits_without_copying() -> None:
    specs = (TensorSpec("a", "float32", ("batch", 2, 3)), TensorSpec("b", "int64", (2,)))
    table = InputTable("two", specs)
    a = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    b = np.array([7, -1], np.int64)
    req = encode_request("two", {"b": b, "a": a})  # order need not follow the signature
    got = table.decode_exact(req)
    assert got is not None and set(got) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    assert got["a"].base is not None and not got["a"].flags.writeable  # a view of the received bytes
    for bad in (
        {"a": a, "b": np.array([7, -1, 3], np.int64)},  # a fixed dim differs
        {"a": a.reshape(2, 3, 2), "b": b},  # trailing dims swapped
        {"a": a},  # an input missing
        {"a": a.astype(np.float64), "b": b},  # wrong datatype
    ):
        assert table.decode_exact(encode_request("two", bad)) is None
    assert (
        table.decode_exact(encode_request("two", {"a": a, "b": b}, typed=True)) is None
    )  # typed: general path
    strings = InputTable("s", (TensorSpec("s", "object", ("batch",)),))
    assert strings.decode_exact(encode_request("s", {"s": np.array([b"x"], np.object_)})) is None
