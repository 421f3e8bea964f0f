"""TLS and credentials on the data path, against real agents (security issue rows 9 and 10):
inference over TLS with a bearer token (refused without), burst over TLS with a token (refused,
with a clear log line, when the endpoint's certificate is not trusted), and a burst NOT_FOUND
that leaves the breaker closed (positive control: UNAVAILABLE opens it)."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgectl.agent.agent import Agent
from edgectl.agent.codecs import decode_response, encode_request, response_parameters
from edgectl.agent.errors import ConfigError
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgectl.security.files import write_private
from edgectl.security.pki import FleetCA
from tests.agent.conftest import Bundles
from tests.agent.onnx_models import run_direct

TOKEN = "s3cret-inference-token"
X = np.random.default_rng(7).standard_normal((2, 4)).astype(np.float32)


def _pki(tmp_path: Path) -> dict[str, Path]:
    ca = FleetCA.create("test serving CA")
    cert, key, ca_file = ca.issue_server(["127.0.0.1", "localhost"]).write(tmp_path / "pki", "server")
    stranger = FleetCA.create("someone else").issue_server(["127.0.0.1"]).write(tmp_path / "other", "server")
    token = tmp_path / "token"
    write_private(token, TOKEN.encode() + b"\n")
    client_cert, client_key, _ = ca.issue_client("edge-7").write(tmp_path / "client", "edge")
    return {
        "cert": cert,
        "key": key,
        "ca": ca_file,
        "token": token,
        "stranger_ca": stranger[2],
        "client_cert": client_cert,
        "client_key": client_key,
    }


def _tls_stub(address: str, ca: Path, token: str | None) -> tuple[grpc.Channel, Any]:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    channel = grpc.secure_channel(address, creds)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def cloud(
    tmp_path: Path, bundles: Bundles, make_agent: Callable[..., Agent]
) -> tuple[Agent, dict[str, Path], Path]:
    pki = _pki(tmp_path)
    art = bundles.build(version=1)
    agent = make_agent(
        serve_only=True,
        model_dir=art.root,
        device_id="",
        data_dir=tmp_path / "cloud",
        http_listen="127.0.0.1:0",
        tls_cert=pki["cert"],
        tls_key=pki["key"],
        token_file=pki["token"],
    )
    return agent, pki, art.root / "model.onnx"


def test_inference_over_tls_needs_the_token(cloud: tuple[Agent, dict[str, Path], Path]) -> None:
    agent, pki, model = cloud
    want = run_direct(model, {"x": X})["y"]
    channel, stub = _tls_stub(agent.address, pki["ca"], TOKEN)
    got = decode_response(stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Health stays open for probes, over TLS.
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    channel.close()
    for token in (None, "wrong"):
        channel, stub = _tls_stub(agent.address, pki["ca"], token)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.close()
    # Plaintext does not even connect.
    plain = grpc.insecure_channel(agent.address)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(plain).ModelInfer(encode_request("mlp", {"x": X}), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()


def test_http_over_tls_needs_the_token(cloud: tuple[Agent, dict[str, Path], Path]) -> None:
    agent, pki, model = cloud
    assert agent.http is not None
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    url = f"https://{agent.http.address}/v2/models/mlp/infer"
    doc = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    )

    def post(headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=doc.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    status, body = post({"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    y = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, run_direct(model, {"x": X})["y"], rtol=1e-5, atol=1e-5)
    assert post({})[0] == 401
    assert post({"Authorization": "Bearer nope"})[0] == 401
    with urllib.request.urlopen(
        f"https://{agent.http.address}/v2/health/ready", timeout=10, context=ctx
    ) as r:
        assert r.status == 200  # probes need no token


def test_token_and_key_files_readable_by_others_are_refused(
    tmp_path: Path, bundles: Bundles, make_agent: Callable[..., Agent]
) -> None:
    pki = _pki(tmp_path)
    pki["token"].chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        make_agent(serve_only=True, model_dir=bundles.build().root, device_id="", token_file=pki["token"])


def _edge(make_agent: Callable[..., Agent], bundles: Bundles, tmp: Path, cloud: Agent, **kw: Any) -> Agent:
    edge = make_agent(
        serve_only=True, model_dir=bundles.build().root, device_id="", data_dir=tmp, burst=cloud.address, **kw
    )
    edge.registry.remove("mlp")  # not served here: every request bursts
    return edge


def test_burst_over_tls_with_a_token_and_refused_for_an_untrusted_certificate(
    tmp_path: Path,
    bundles: Bundles,
    make_agent: Callable[..., Agent],
    cloud: tuple[Agent, dict[str, Path], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, pki, model = cloud
    edge = _edge(
        make_agent, bundles, tmp_path / "edge", agent, burst_ca=pki["ca"], burst_token_file=pki["token"]
    )
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(edge.address))
    response = stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10)
    assert response_parameters(response)["served_by"] == f"burst:{agent.address}"
    np.testing.assert_allclose(
        decode_response(response)["y"], run_direct(model, {"x": X})["y"], rtol=1e-5, atol=1e-5
    )
    # The same endpoint behind a certificate this edge does not trust: refused, and the log says why.
    wary = _edge(
        make_agent,
        bundles,
        tmp_path / "wary",
        agent,
        burst_ca=pki["stranger_ca"],
        burst_token_file=pki["token"],
    )
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(wary.address))
    with caplog.at_level(logging.WARNING, logger="edgectl.agent.burst"), pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    assert any("is --burst-ca the CA that signed" in r.getMessage() for r in caplog.records), caplog.text


def test_a_burst_not_found_leaves_the_breaker_closed_and_unavailable_opens_it(
    tmp_path: Path, bundles: Bundles, make_agent: Callable[..., Agent]
) -> None:
    cloud = make_agent(serve_only=True, model_dir=bundles.build().root, device_id="", data_dir=tmp_path / "c")
    edge = _edge(make_agent, bundles, tmp_path / "edge", cloud)
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(edge.address))
    assert edge.router.burst is not None
    for _ in range(6):  # a model neither side serves: the cloud answers NOT_FOUND every time
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(encode_request("ghost", {"x": X}), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert edge.router.burst.breaker.state == "closed"
    assert response_parameters(stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10))[
        "served_by"
    ].startswith("burst:")  # legitimate bursts still go through
    # Positive control: an endpoint that is down opens the circuit.
    cloud.stop()
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10)
    assert edge.router.burst.breaker.state == "open"


def test_burst_with_a_client_certificate_to_an_mtls_endpoint(
    tmp_path: Path, bundles: Bundles, make_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture
) -> None:
    pki = _pki(tmp_path)
    art = bundles.build()
    cloud = make_agent(
        serve_only=True,
        model_dir=art.root,
        device_id="",
        data_dir=tmp_path / "mtls-cloud",
        tls_cert=pki["cert"],
        tls_key=pki["key"],
        tls_client_ca=pki["ca"],
    )
    edge = _edge(
        make_agent,
        bundles,
        tmp_path / "edge",
        cloud,
        burst_ca=pki["ca"],
        burst_cert=pki["client_cert"],
        burst_key=pki["client_key"],
    )
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(edge.address))
    response = stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10)
    assert response_parameters(response)["served_by"] == f"burst:{cloud.address}"
    np.testing.assert_allclose(
        decode_response(response)["y"],
        run_direct(art.root / "model.onnx", {"x": X})["y"],
        rtol=1e-5,
        atol=1e-5,
    )
    # Without a client certificate the endpoint refuses the handshake; the log says so.
    bare = _edge(make_agent, bundles, tmp_path / "bare", cloud, burst_ca=pki["ca"])
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(bare.address))
    with caplog.at_level(logging.WARNING, logger="edgectl.agent.burst"), pytest.raises(grpc.RpcError):
        stub.ModelInfer(encode_request("mlp", {"x": X}), timeout=10)
    assert any("burst endpoint" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


TRITON_TLS_CHILD = """
import sys
import numpy as np
proto, url, ca, token = sys.argv[1:5]
if proto == "grpc":
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(url=url, ssl=True, root_certificates=ca)
    headers = {"authorization": f"Bearer {token}"}
else:
    import tritonclient.http as tc
    client = tc.InferenceServerClient(url=url, ssl=True, ssl_options={"ca_certs": ca})
    headers = {"Authorization": f"Bearer {token}"}
from tritonclient.utils import InferenceServerException
x = tc.InferInput("x", [2, 4], "FP32")
x.set_data_from_numpy(np.ones((2, 4), np.float32))
print(client.infer("mlp", [x], headers=headers).as_numpy("y").tolist())
try:
    client.infer("mlp", [x])
    print("accepted without a token")
except InferenceServerException as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_stock_tritonclient_over_tls_with_a_token(
    proto: str, cloud: tuple[Agent, dict[str, Path], Path]
) -> None:
    agent, pki, model = cloud
    assert agent.http is not None
    url = agent.address if proto == "grpc" else agent.http.address
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_TLS_CHILD, proto, url, str(pki["ca"]), TOKEN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()
    want = run_direct(model, {"x": np.ones((2, 4), np.float32)})["y"]
    np.testing.assert_allclose(np.array(json.loads(first), np.float32), want, rtol=1e-5, atol=1e-5)
    assert second.startswith("refused:") and "token" in second
