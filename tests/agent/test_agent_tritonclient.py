"""The stock tritonclient (grpc and http) calling every method it has for what the agent serves,
against a real agent on free ports; outputs compared to a direct onnxruntime run.

These run the client in a child process, one per protocol, as a user's separate program would;
the last test imports tritonclient beside the agent in one process (its ``inference.*`` protobuf
names are ours too: our V2 modules keep them in a descriptor pool of their own).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgectl.agent.agent import Agent
from tests.agent.conftest import Bundles
from tests.agent.onnx_models import run_direct

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    proto, url = sys.argv[1], sys.argv[2]
    if proto == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException
    client = tc.InferenceServerClient(url=url)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("mlp"),
        "model_ready_v1": client.is_model_ready("mlp", "1"),
        "model_ready_v9": client.is_model_ready("mlp", "9"),
    }
    j = {"as_json": True} if proto == "grpc" else {}
    out["server"] = client.get_server_metadata(**j)
    out["meta"] = client.get_model_metadata("mlp", **j)
    out["config"] = client.get_model_config("mlp", **j)
    out["index"] = client.get_model_repository_index(**j)
    results = []
    for i, binary in enumerate([True, False]):
        x = np.random.default_rng(i).standard_normal((i + 2, 4)).astype(np.float32)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        if proto == "http":
            inp.set_data_from_numpy(x, binary_data=binary)
            want = [tc.InferRequestedOutput("y", binary_data=binary)]
        else:
            inp.set_data_from_numpy(x)
            want = [tc.InferRequestedOutput("y")]
        res = client.infer("mlp", [inp], outputs=want, request_id=f"r{i}")
        results.append({"y": res.as_numpy("y").tolist(), "id": res.get_response(**j)["id"]})
    # No outputs named: every output comes back (binary by default over HTTP).
    inp = tc.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    results.append({"y": client.infer("mlp", [inp], model_version="1").as_numpy("y").tolist(), "id": ""})
    out["results"] = results
    out["stats"] = client.get_inference_statistics("mlp", **j)
    bad = tc.InferInput("x", [1, 5], "FP32")
    bad.set_data_from_numpy(np.ones((1, 5), np.float32))
    try:
        client.infer("mlp", [bad])
        out["bad"] = "accepted"
    except InferenceServerException as exc:
        out["bad"] = str(exc)
    try:
        client.get_model_metadata("ghost")
        out["ghost"] = "found"
    except InferenceServerException as exc:
        out["ghost"] = str(exc)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_stock_tritonclient_every_method(
    proto: str, bundles: Bundles, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    art = bundles.build(version=1)
    agent = make_agent(serve_only=True, model_dir=art.root, device_id="", http_listen="127.0.0.1:0")
    assert agent.http is not None
    url = agent.address if proto == "grpc" else agent.http.address
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, proto, url], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] and out["model_ready_v1"]
    assert not out["model_ready_v9"]
    assert out["server"]["name"] == "edgectl-agent"
    assert out["meta"]["name"] == "mlp" and out["meta"]["versions"] == ["1"]
    config = out["config"]["config"] if proto == "grpc" else out["config"]
    assert config["name"] == "mlp" and config["platform"] == "onnxruntime_onnx"
    assert int(config["max_batch_size"]) == 1024 and config["input"][0]["data_type"] == "TYPE_FP32"
    index = out["index"]["models"] if proto == "grpc" else out["index"]
    assert [(m["name"], m["version"], m["state"]) for m in index] == [("mlp", "1", "READY")]
    model = art.root / "model.onnx"
    for i, result in enumerate(out["results"][:2]):
        x = np.random.default_rng(i).standard_normal((i + 2, 4)).astype(np.float32)
        np.testing.assert_allclose(
            np.array(result["y"], np.float32), run_direct(model, {"x": x})["y"], rtol=1e-5, atol=1e-5
        )
        assert result["id"] == f"r{i}"
    want = run_direct(model, {"x": np.ones((1, 4), np.float32)})["y"]
    np.testing.assert_allclose(np.array(out["results"][2]["y"], np.float32), want, rtol=1e-5, atol=1e-5)
    (stats,) = out["stats"]["model_stats"]
    assert stats["name"] == "mlp" and stats["version"] == "1"
    assert int(stats["inference_stats"]["success"]["count"]) == 3
    assert int(stats["inference_count"]) == 2 + 3 + 1
    assert "[-1, 4]" in out["bad"]
    assert "not served" in out["ghost"]


def test_tritonclient_and_the_agent_in_one_process(
    bundles: Bundles, make_agent: Callable[..., Agent]
) -> None:
    """A user's own test starts an agent and calls it with the stock client in the same process
    (both register ``inference.DataType`` and friends: this used to fail at import)."""
    import tritonclient.grpc as tc

    art = bundles.build(version=1)
    agent = make_agent(serve_only=True, model_dir=art.root, device_id="")
    client = tc.InferenceServerClient(url=agent.address)
    try:
        assert client.is_model_ready("mlp")
        assert client.get_model_config("mlp").config.name == "mlp"
        x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("mlp", [inp]).as_numpy("y")
        # Triton's classification extension is refused, not answered with the raw tensor.
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="classification extension is not served"):
            client.infer("mlp", [inp], outputs=[tc.InferRequestedOutput("y", class_count=2)])
        assert client.is_server_live()
    finally:
        client.close()
    np.testing.assert_allclose(got, run_direct(art.root / "model.onnx", {"x": x})["y"], rtol=1e-5, atol=1e-5)
