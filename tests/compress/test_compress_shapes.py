"""`edgectl compress` on exports whose shapes are not what a dynamic-batch export gives: a batch fixed
at 1, a shape baked into the graph. Real ORT sessions on graphs built with onnx.helper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.compress.test_compress_cli import invoke


def _mlp(path: Path, batch: int | str, *, reshape_to: list[int] | None = None) -> Path:
    """x[batch, 16] -> MatMul 16x32 -> Relu -> MatMul 32x8 (-> a Reshape to a fixed shape)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32) * 0.3, "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y" if reshape_to is None else "z"], name="mm2"),
    ]
    inits = [w1, w2]
    out_shape: list[int | str] = [batch, 8]
    if reshape_to is not None:
        inits.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["z", "shape"], ["y"], name="baked"))
        out_shape = list(reshape_to)
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_model_with_a_fixed_batch_of_one_is_fed_one_sample_at_a_time(tmp_path: Path) -> None:
    # torch.onnx.export without dynamic_axes fixes the batch at the example's: ORT refuses any other.
    model = _mlp(tmp_path / "fixed.onnx", 1)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    out = tmp_path / "art"
    code, text = invoke(
        model, "--profile", "x86-cpu-vnni", "--quantize", "int8-static", "--calib", data, "--eval", data,
        "--max-drop", "0.05", "-o", out, "--json",
    )  # fmt: skip
    assert code == 0, text
    metrics = json.loads(text)["metrics"]
    assert metrics["eval_samples"] == 40 and metrics["quality_drop"] <= 0.05


def test_samples_that_do_not_fill_a_fixed_batch_are_refused_by_name(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "fixed4.onnx", 4)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((10, 16), np.float32))
    code, text = invoke(model, "--profile", "x86-cpu-vnni", "--calib", data, "-o", tmp_path / "art")
    assert code == 2, text
    assert "10 samples" in text and "batches of exactly 4" in text
    assert not (tmp_path / "art").exists()


def test_a_float_model_that_fails_on_the_samples_is_a_clear_error(tmp_path: Path) -> None:
    # An export that baked its trace's shape into a Reshape runs only at that shape.
    model = _mlp(tmp_path / "baked.onnx", "n", reshape_to=[4, 4])
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, 16), np.float32))
    code, text = invoke(model, "--profile", "x86-cpu-vnni", "--eval", data, "-o", tmp_path / "art")
    assert code == 2, text
    assert "the float model fails on the evaluation file data.npz" in text
    assert not (tmp_path / "art").exists()


def test_an_already_quantized_model_is_refused_with_the_way_out(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgectl.compress.data import SampleSet
    from edgectl.compress.quantizer import _Reader

    x = np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)
    qdq = tmp_path / "qdq.onnx"
    quantize_static(
        str(_mlp(tmp_path / "float.onnx", "n")), str(qdq), _Reader(SampleSet({"x": x}, None, "c")),
        quant_format=QuantFormat.QDQ,
    )  # fmt: skip
    data = tmp_path / "data.npz"
    np.savez(data, x=x)
    code, text = invoke(qdq, "--profile", "x86-cpu-vnni", "--calib", data, "-o", tmp_path / "art")
    assert code == 2, text
    assert "quantized already" in text and "QuantizeLinear" in text and "--quantize none" in text
    assert not (tmp_path / "art").exists()
    code, text = invoke(qdq, "--profile", "x86-cpu-vnni", "--quantize", "none", "-o", tmp_path / "art")
    assert code == 0, text


def test_a_foreign_exception_is_described_in_one_line_even_without_a_message() -> None:
    from edgectl.compress.errors import describe

    assert describe(AssertionError()) == "AssertionError"
    assert describe(RuntimeError("first\nsecond")) == "RuntimeError: first"
