"""The one tensor signature (edgectl.artifact.TensorSpec): manifest form, shape rules, and building it
from a real onnxruntime session, including unnamed and symbolic dynamic dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgectl.artifact import ManifestError, TensorSpec, UnsupportedTensorTypeError, read_golden, write_golden


def _identity_model(path: Path, dims: list[int | str | None], elem: int = TensorProto.FLOAT) -> Path:
    """x -> Identity -> y with ``dims`` (None: a dim with neither value nor name)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem, dims)],
        [helper.make_tensor_value_info("y", elem, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_from_a_real_session_dynamic_dims_are_names(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(_identity_model(tmp_path / "m.onnx", ["batch", None, 4])))
    (spec,) = (TensorSpec.from_node_arg(a) for a in session.get_inputs())
    assert spec == TensorSpec("x", "float32", ("batch", "d1", 4))
    assert spec.batched and spec.wire_shape() == [-1, -1, 4]
    assert spec.accepts((2, 7, 4)) and not spec.accepts((2, 7, 5)) and not spec.accepts((2, 4))
    assert TensorSpec.from_dict(spec.to_dict(), "inputs[]") == spec


def test_an_element_type_without_a_numpy_twin_is_refused(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "bf16.onnx", [1, 4], TensorProto.BFLOAT16)
    session = ort.InferenceSession(str(path))
    with pytest.raises(UnsupportedTensorTypeError, match="bfloat16"):
        TensorSpec.from_node_arg(session.get_inputs()[0])


def test_a_fixed_first_dim_is_not_batched() -> None:
    assert not TensorSpec("x", "float32", (1, 4)).batched
    assert not TensorSpec("x", "float32", ()).batched


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"dtype": "float32", "shape": [1]}, "missing field 'name'"),
        ({"name": "x", "dtype": 3, "shape": [1]}, "'dtype' has the wrong type"),
        ({"name": "x", "dtype": "float32", "shape": [-1]}, "non-negative ints or names"),
        ({"name": "x", "dtype": "float32", "shape": [True]}, "non-negative ints or names"),
    ],
)
def test_bad_manifest_tensors_name_the_field(obj: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        TensorSpec.from_dict(obj, "inputs[]")


def test_golden_arrays_are_checked_by_the_same_shape_rule(tmp_path: Path) -> None:
    spec_in, spec_out = TensorSpec("x", "float32", ("batch", 4)), TensorSpec("y", "float32", ("batch", 2))
    x, y = np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32)
    write_golden(tmp_path / "g.npz", {"x": x}, {"y": y}, [spec_in], [spec_out])
    ins, _ = read_golden(tmp_path / "g.npz", [spec_in], [spec_out])
    assert ins["x"].shape == (3, 4)
    with pytest.raises(ManifestError, match="has shape"):
        write_golden(
            tmp_path / "bad.npz", {"x": np.zeros((3, 5), np.float32)}, {"y": y}, [spec_in], [spec_out]
        )
