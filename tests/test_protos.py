"""The wire contracts: committed modules match the .proto files; V2 is the standard's wire format."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgectl.protos.inference import grpc_predict_v2_pb2 as v2
from edgectl.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, fleet_pb2, rollouts_pb2

REPO = Path(__file__).resolve().parent.parent


def test_regenerating_the_protos_changes_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_services_are_versioned() -> None:
    assert artifacts_pb2_grpc.ArtifactServiceStub.__module__.startswith("edgectl.protos.v1")
    names = {
        s.full_name
        for mod in (artifacts_pb2, fleet_pb2, rollouts_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert names == {
        "edgectl.v1.ArtifactService",
        "edgectl.v1.FleetService",
        "edgectl.v1.RolloutService",
        "edgectl.v1.AuditService",
    }


def test_v2_messages_are_wire_compatible_with_tritonclient(tmp_path: Path) -> None:
    """Bytes we write parse in tritonclient's own generated classes, field for field, and back.

    The check runs in a clean child process: tritonclient's classes only, no edgectl import first.
    """
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] is a dev dependency: make setup installs it")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ours = v2.ModelInferRequest(model_name="m", model_version="3", id="r1")
    ours.parameters["priority"].int64_param = 2
    tensor = ours.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    tensor.parameters["binary"].bool_param = True
    ours.outputs.add(name="y")
    ours.raw_input_contents.append(x.tobytes())
    (tmp_path / "req.bin").write_bytes(ours.SerializeToString())
    child = textwrap.dedent(
        f"""
        import json, numpy as np
        from tritonclient.grpc import service_pb2 as t
        req = t.ModelInferRequest.FromString(open({str(tmp_path / "req.bin")!r}, "rb").read())
        print(json.dumps([req.model_name, req.model_version, req.id, req.parameters["priority"].int64_param,
                          list(req.inputs[0].shape), req.inputs[0].datatype,
                          req.inputs[0].parameters["binary"].bool_param, req.outputs[0].name,
                          np.frombuffer(req.raw_input_contents[0], np.float32).tolist()]))
        reply = t.ModelInferResponse(model_name="m", id="r1")
        reply.outputs.add(name="y", datatype="FP32", shape=[2])
        reply.raw_output_contents.append(np.ones(2, np.float32).tobytes())
        open({str(tmp_path / "reply.bin")!r}, "wb").write(reply.SerializeToString())
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["m", "3", "r1", 2, [2, 3], "FP32", True, "y", x.ravel().tolist()]
    back = v2.ModelInferResponse.FromString((tmp_path / "reply.bin").read_bytes())
    assert back.outputs[0].name == "y" and list(back.outputs[0].shape) == [2]
    assert np.array_equal(np.frombuffer(back.raw_output_contents[0], np.float32), np.ones(2, np.float32))
    assert (
        v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"
    )
