"""A request's batch is capped by the max_batch_size its model's ModelConfig advertises, as Triton
caps it: the stock tritonclient (gRPC and HTTP) against real V2 servers on free ports gets
INVALID_ARGUMENT / 400 with Triton's words for one row too many, before any tensor is decoded;
a model without a batch dimension (max_batch_size 0) takes whatever shape its signature fixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from edgectl.agent.batching import BatchSettings
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
from tests.agent.onnx_models import mlp_model, run_direct
from tests.agent.v2_harness import InProcessV2

TOO_MANY = "inference request batch-size must be <= 4 for 'mlp'"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessV2]:
    s = InProcessV2(
        mlp_model(tmp_path / "mlp.onnx"),
        name="mlp",
        batch=BatchSettings(max_batch_size=4, max_request_rows=4),
        http=True,
    )
    try:
        yield s
    finally:
        s.close()


def _client(proto: str, served: InProcessV2) -> Any:
    assert served.http is not None
    if proto == "grpc":
        return tg.InferenceServerClient(served.server.address)
    return th.InferenceServerClient(served.http.address, network_timeout=10)


def _input(module: Any, x: np.ndarray, binary: bool = True) -> Any:
    inp = module.InferInput("x", list(x.shape), "FP32")
    if module is th:
        inp.set_data_from_numpy(x, binary_data=binary)
    else:
        inp.set_data_from_numpy(x)
    return inp


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_a_batch_over_the_advertised_max_batch_size_is_refused(proto: str, served: InProcessV2) -> None:
    module: Any = tg if proto == "grpc" else th
    client = _client(proto, served)
    want_status = "StatusCode.INVALID_ARGUMENT" if proto == "grpc" else "400"
    try:
        config = client.get_model_config("mlp", **({"as_json": True} if proto == "grpc" else {}))
        config = config["config"] if proto == "grpc" else config
        assert int(config["max_batch_size"]) == 4
        x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
        y = client.infer("mlp", [_input(module, x)]).as_numpy("y")  # at the limit: served
        np.testing.assert_allclose(y, run_direct(served.model_path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
        five = np.ones((5, 4), np.float32)
        for binary in (True, False) if proto == "http" else (True,):
            with pytest.raises(InferenceServerException) as caught:
                client.infer("mlp", [_input(module, five, binary)])
            assert str(caught.value.status()) == want_status
            assert TOO_MANY in caught.value.message(), caught.value.message()
            assert "split the request" in caught.value.message()
    finally:
        client.close()
    stats = served.registry.get("mlp")
    assert stats is not None and stats.stats.snapshot().execution_count == 1  # the refused ones never ran


def test_the_batch_is_refused_from_the_header_before_the_data_is_read(served: InProcessV2) -> None:
    """A request that declares a million rows and carries 16 bytes is refused for its batch, not
    for its data: nothing of the declared size was decoded or allocated."""
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1_000_000, 4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert TOO_MANY in (caught.value.details() or "")


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_a_model_without_a_batch_dimension_is_not_capped(proto: str, tmp_path: Path) -> None:
    """max_batch_size 0: the first dimension is the model's own (16 rows here, past the micro-batch
    limit of 4), and a request of that shape is served."""
    path = mlp_model(tmp_path / "fixed.onnx", batch=False, rows=16)
    served = InProcessV2(
        path, name="fixed", batch=BatchSettings(max_batch_size=4, max_request_rows=4), http=True
    )
    module: Any = tg if proto == "grpc" else th
    client = _client(proto, served)
    try:
        config = client.get_model_config("fixed", **({"as_json": True} if proto == "grpc" else {}))
        config = config["config"] if proto == "grpc" else config
        assert int(config.get("max_batch_size", 0)) == 0
        x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
        y = client.infer("fixed", [_input(module, x)]).as_numpy("y")
        np.testing.assert_allclose(y, run_direct(path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    finally:
        client.close()
        served.close()


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_by_default_a_request_may_carry_more_rows_than_the_micro_batch(proto: str, tmp_path: Path) -> None:
    """The micro-batch size (8 by default) is what combined runs aim for, Triton's preferred batch
    size; a client's 64-row request (the demo's) is served whole, and the ModelConfig advertises the
    request cap (1024) as max_batch_size, which is what tritonclient users size batches from."""
    path = mlp_model(tmp_path / "mlp.onnx")
    served = InProcessV2(path, name="mlp", batch=BatchSettings(), http=True)
    module: Any = tg if proto == "grpc" else th
    client = _client(proto, served)
    try:
        config = client.get_model_config("mlp", **({"as_json": True} if proto == "grpc" else {}))
        config = config["config"] if proto == "grpc" else config
        assert int(config["max_batch_size"]) == 1024
        assert [int(n) for n in config["dynamic_batching"]["preferred_batch_size"]] == [8]
        x = np.random.default_rng(2).standard_normal((64, 4)).astype(np.float32)
        y = client.infer("mlp", [_input(module, x)]).as_numpy("y")
        np.testing.assert_allclose(y, run_direct(path, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    finally:
        client.close()
        served.close()
