"""Vectorized per-channel weight quantization writes the model ORT's own per-channel loop writes.

Real ORT quantizer on both sides: the same float model quantized with and without
``vectorized_per_channel`` must serialize to the same bytes, for every 8-bit type and range option,
on weights with awkward channels (all zero, constant, all negative, subnormal, one huge outlier).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgectl.compress.perchannel import vectorized_per_channel


def _awkward(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    w = rng.normal(0, 0.05, shape).astype(np.float32)
    special = [
        np.zeros_like,
        lambda c: np.full_like(c, 0.25),
        lambda c: -np.abs(c) - 0.01,
        lambda c: np.full_like(c, 1e-40),  # subnormal: ORT's tiny-scale branch
        lambda c: np.where(np.arange(c.size).reshape(c.shape) == 0, 40.0, c).astype(np.float32),
        lambda c: np.abs(c),
    ]
    moved = np.moveaxis(w, axis, 0)
    for i, make in enumerate(special):
        moved[i] = make(moved[i])
    return np.ascontiguousarray(np.moveaxis(moved, 0, axis))


def _model(path: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """x[1,3,6,6] -> Conv(8 filters) -> Flatten -> MatMul[288x24] -> Gemm(transB)[10x24] -> y."""
    rng = np.random.default_rng(seed)
    conv = _awkward(rng, (8, 3, 3, 3), 0)
    mat = _awkward(rng, (288, 24), 1)
    gemm = _awkward(rng, (10, 24), 0)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "mat_w"], ["m"]),
        helper.make_node("Gemm", ["m", "gemm_w"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (("conv_w", conv), ("mat_w", mat), ("gemm_w", gemm))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path, {"x": rng.normal(0, 1, (4, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("weights", ["s8", "u8"])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_dynamic_per_channel_matches_orts_loop(tmp_path: Path, weights: str, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, _ = _model(tmp_path / "m.onnx", seed=1)
    qtype = QuantType.QInt8 if weights == "s8" else QuantType.QUInt8
    out: list[bytes] = []
    for fast in (False, True):
        dst = tmp_path / f"q{fast}.onnx"
        with vectorized_per_channel() if fast else contextlib.nullcontext():
            quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=reduce_range, weight_type=qtype,
                             op_types_to_quantize=["MatMul", "Gemm", "Conv"])  # fmt: skip
        out.append(dst.read_bytes())
    assert out[0] == out[1]
    assert b"mat_w_quantized" in out[1]


@pytest.mark.parametrize("symmetric", [None, True, False])
def test_static_qoperator_per_channel_matches_orts_loop(tmp_path: Path, symmetric: bool | None) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, feed = _model(tmp_path / "m.onnx", seed=2)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": feed["x"][i : i + 1]} for i in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    extra = {} if symmetric is None else {"WeightSymmetric": symmetric}
    out: list[bytes] = []
    for fast in (False, True):
        dst = tmp_path / f"q{fast}.onnx"
        with vectorized_per_channel() if fast else contextlib.nullcontext():
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=extra)  # fmt: skip
        out.append(dst.read_bytes())
    assert out[0] == out[1]


def test_the_patch_is_removed_on_exit_even_after_an_error() -> None:
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    before = BaseQuantizer.quantize_weight_per_channel_impl
    with pytest.raises(RuntimeError), vectorized_per_channel():
        assert BaseQuantizer.quantize_weight_per_channel_impl is not before
        raise RuntimeError("boom")
    assert BaseQuantizer.quantize_weight_per_channel_impl is before


def test_nested_and_concurrent_uses_restore_orts_method_once_all_have_left(tmp_path: Path) -> None:
    import threading

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    before = BaseQuantizer.quantize_weight_per_channel_impl
    # One source per thread: ORT's quantizer writes a shape-inferred copy beside its input.
    sources = [_model(tmp_path / f"m{i}.onnx", seed=3)[0] for i in range(4)]
    errors: list[BaseException] = []

    def build(i: int) -> None:
        try:
            with vectorized_per_channel(), vectorized_per_channel():
                quantize_dynamic(str(sources[i]), str(tmp_path / f"t{i}.onnx"), per_channel=True,
                                 weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert BaseQuantizer.quantize_weight_per_channel_impl is before
    assert len({(tmp_path / f"t{i}.onnx").read_bytes() for i in range(4)}) == 1
