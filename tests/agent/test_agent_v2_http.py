"""KServe V2 over HTTP/REST against a real aiohttp server sharing the gRPC server's registry:
every path, JSON and binary tensors (Triton's extension), errors with their statuses, curl."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgectl.agent.batching import BatchSettings
from edgectl.agent.http_codec import HEADER_LENGTH
from tests.agent.onnx_models import int_model, mlp_model, run_direct, string_model
from tests.agent.v2_harness import InProcessV2

X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessV2]:
    s = InProcessV2(
        mlp_model(tmp_path / "mlp.onnx", (4, 8, 3)), name="mlp", version=5, batch=BatchSettings(), http=True
    )
    try:
        yield s
    finally:
        s.close()


def _call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _json(url: str, doc: Any = None) -> tuple[int, Any]:
    status, _, body = _call(url, None if doc is None else json.dumps(doc).encode())
    return status, json.loads(body) if body else None


def test_health_metadata_config_stats_index(served: InProcessV2) -> None:
    u = served.url
    assert _call(f"{u}/v2/health/live")[0] == 200
    assert _call(f"{u}/v2/health/ready")[0] == 200
    assert _json(f"{u}/v2")[1]["name"] == "edgectl-agent"
    status, meta = _json(f"{u}/v2/models/mlp")
    assert status == 200 and meta["versions"] == ["5"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert _json(f"{u}/v2/models/mlp/versions/5")[0] == 200
    assert _call(f"{u}/v2/models/mlp/ready")[0] == 200
    assert _call(f"{u}/v2/models/mlp/versions/4/ready")[0] == 400
    config = _json(f"{u}/v2/models/mlp/config")[1]
    assert config["max_batch_size"] == 1024 and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [4]
    stats = _json(f"{u}/v2/models/mlp/stats")[1]
    assert stats["model_stats"][0]["version"] == "5"
    assert _json(f"{u}/v2/models/stats")[1]["model_stats"][0]["name"] == "mlp"
    assert _json(f"{u}/v2/repository/index", {})[1] == [
        {"name": "mlp", "version": "5", "state": "READY", "reason": ""}
    ]
    status, err = _json(f"{u}/v2/models/ghost")
    assert status == 404 and "not served" in err["error"]


def test_json_infer_matches_direct_onnxruntime(served: InProcessV2) -> None:
    doc = {
        "id": "j1",
        "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": X.ravel().tolist()}],
    }
    status, got = _json(f"{served.url}/v2/models/mlp/infer", doc)
    assert status == 200, got
    assert got["id"] == "j1" and got["model_version"] == "5" and got["parameters"]["served_by"] == "local"
    (out,) = got["outputs"]
    y = np.array(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(y, run_direct(served.model_path, {"x": X})["y"], rtol=1e-5, atol=1e-5)


def _binary_request(
    x: np.ndarray, *, binary_out: bool = True, extra: bytes = b"", size: int | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    doc = {
        "inputs": [
            {
                "name": "x",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": size or len(raw)},
            }
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": binary_out}}],
    }
    header = json.dumps(doc).encode()
    return header + raw + extra, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def test_binary_infer_in_and_out(served: InProcessV2) -> None:
    body, headers = _binary_request(X)
    status, rheaders, rbody = _call(f"{served.url}/v2/models/mlp/versions/5/infer", body, headers)
    assert status == 200, rbody
    hlen = int(rheaders[HEADER_LENGTH])
    doc = json.loads(rbody[:hlen])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4
    y = np.frombuffer(rbody[hlen:], np.float32).reshape(3, 3)
    np.testing.assert_allclose(y, run_direct(served.model_path, {"x": X})["y"], rtol=1e-5, atol=1e-5)
    # Binary in, JSON out.
    body, headers = _binary_request(X, binary_out=False)
    status, rheaders, rbody = _call(f"{served.url}/v2/models/mlp/infer", body, headers)
    assert status == 200 and HEADER_LENGTH not in rheaders
    assert len(json.loads(rbody)["outputs"][0]["data"]) == 9


@pytest.mark.parametrize(
    ("what", "make", "status", "needle"),
    [
        ("JSON that does not parse", lambda: (b"{nope", {}), 400, "does not parse"),
        ("header length past the body", lambda: (b"{}", {HEADER_LENGTH: "999"}), 400, "runs past the body"),
        ("binary size past the body", lambda: _binary_request(X, size=4096), 400, "runs past the body"),
        ("bytes left over", lambda: _binary_request(X, extra=b"\0" * 8), 400, "do not add up"),
        ("wrong dtype", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [0, 0, 0, 0]}]}).encode(), {}), 400, "must be float32"),
        ("10^12 elements", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [250000000000, 4], "datatype": "FP32", "data": [0]}]}).encode(), {}), 400, "batch-size must be <= 1024"),
        ("BYTES to a float model", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}]}).encode(), {}), 400, "must be float32"),
        ("a bool as a dimension", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [True, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}).encode(), {}), 400, "list of integers"),
        ("null in JSON data", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, None, 0, 0]}]}).encode(), {}), 400, "must be numbers for FP32"),
        ("booleans as FP32", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [True, False, True, True]}]}).encode(), {}), 400, "got booleans"),
        ("strings as FP32", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["1", "2", "3", "4"]}]}).encode(), {}), 400, "got strings"),
        ("'outputs' not a list", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}], "outputs": "y"}).encode(), {}), 400, "'outputs' must be a list"),
        ("classification asked", lambda: (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}], "outputs": [{"name": "y", "parameters": {"classification": 2}}]}).encode(), {}), 400, "classification extension is not served"),
    ],
)  # fmt: skip
def test_malformed_http_requests_get_their_status(
    served: InProcessV2, what: str, make: Any, status: int, needle: str
) -> None:
    body, headers = make()
    got, _, rbody = _call(f"{served.url}/v2/models/mlp/infer", body, headers)
    assert got == status, rbody
    assert needle in json.loads(rbody)["error"]
    # Unknown model and version are 404; the server keeps serving.
    assert _call(f"{served.url}/v2/models/ghost/infer", b"{}")[0] == 404
    assert _call(f"{served.url}/v2/models/mlp/versions/9/infer", b"{}")[0] == 404
    assert _call(f"{served.url}/v2/health/ready")[0] == 200


def test_json_bytes_data_must_be_strings(tmp_path: Path) -> None:
    """A number, null or object in a BYTES input's JSON data is refused, not served as its repr."""
    s = InProcessV2(string_model(tmp_path / "s.onnx"), name="s", http=True)
    try:
        url = f"{s.url}/v2/models/s/infer"
        for data in ([1, 2], ["a", None], [{"b64": "YQ=="}, "b"]):
            doc = {"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": data}]}
            status, body = _json(url, doc)
            assert status == 400 and "must be JSON strings" in body["error"], (data, body)
        doc = {"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", "wörld"]}]}
        status, body = _json(url, doc)
        assert status == 200 and body["outputs"][0]["data"] == ["a", "wörld"]
    finally:
        s.close()


def test_request_over_the_byte_cap_is_413(served: InProcessV2) -> None:
    body = b"0" * ((64 << 20) + 1)
    assert _call(f"{served.url}/v2/models/mlp/infer", body)[0] == 413


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reaches_the_rest_paths(served: InProcessV2) -> None:
    def curl(*args: str) -> tuple[str, str]:
        out = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        body, _, code = out.rpartition("\n")
        return code, body

    u = served.url
    assert curl(f"{u}/v2/health/ready")[0] == "200"
    assert json.loads(curl(f"{u}/v2/models/mlp")[1])["name"] == "mlp"
    assert json.loads(curl(f"{u}/v2/models/mlp/config")[1])["name"] == "mlp"
    assert "model_stats" in json.loads(curl(f"{u}/v2/models/mlp/stats")[1])
    assert json.loads(curl("-X", "POST", f"{u}/v2/repository/index")[1])[0]["name"] == "mlp"
    doc = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    code, body = curl(
        "-X", "POST", "-H", "Content-Type: application/json", "-d", doc, f"{u}/v2/models/mlp/infer"
    )
    assert code == "200"
    want = run_direct(served.model_path, {"x": np.array([[1, 2, 3, 4]], np.float32)})["y"]
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], want.ravel(), rtol=1e-5, atol=1e-5)


def test_an_outputs_binary_data_false_overrides_binary_data_output(served: InProcessV2) -> None:
    """Triton's rule: the request's binary_data_output is the default, an output's binary_data wins."""
    doc = {
        "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": X.ravel().tolist()}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    }
    status, headers, body = _call(f"{served.url}/v2/models/mlp/infer", json.dumps(doc).encode())
    assert status == 200 and HEADER_LENGTH not in headers, body
    (out,) = json.loads(body)["outputs"]
    want = run_direct(served.model_path, {"x": X})["y"]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]), want, rtol=1e-5, atol=1e-5
    )
    # binary_data_output alone, outputs not named: every output binary.
    doc = {"inputs": doc["inputs"], "parameters": {"binary_data_output": True}}
    status, headers, body = _call(f"{served.url}/v2/models/mlp/infer", json.dumps(doc).encode())
    assert status == 200 and int(headers[HEADER_LENGTH]) < len(body)


def test_integer_json_data_is_checked_not_coerced(tmp_path: Path) -> None:
    """A fractional number or an out-of-range value for an integer input is a 400, not truncated."""
    s = InProcessV2(
        int_model(tmp_path / "int.onnx"), name="ints", version=1, batch=BatchSettings(), http=True
    )
    try:
        url = f"{s.url}/v2/models/ints/infer"

        def infer(data: list[Any]) -> tuple[int, Any]:
            return _json(
                url, {"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": data}]}
            )

        status, got = infer([3, 4])
        assert status == 200 and got["outputs"][0]["data"] == [4, 5], got
        status, got = infer([3.5, 4])
        assert status == 400 and "must be integers for INT64, got fractional numbers" in got["error"]
        status, got = infer([2**70, 4])
        assert status == 400 and "INT64" in got["error"]
        assert _call(f"{s.url}/v2/health/ready")[0] == 200
    finally:
        s.close()


def test_repository_index_ready_must_be_a_boolean(served: InProcessV2) -> None:
    status, err = _json(f"{served.url}/v2/repository/index", {"ready": "false"})
    assert status == 400 and "'ready' must be true or false" in err["error"]
    assert _json(f"{served.url}/v2/repository/index", {"ready": False})[0] == 200
