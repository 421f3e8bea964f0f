"""Per-channel weight quantization for ORT's QOperator quantizer, one array operation per weight.

ORT's ``quantize_weight_per_channel_impl`` quantizes a weight one channel at a time in Python (a
range, a scale, a zero point and a rounding per channel): on MiniLM that loop is ~30,000 calls and
a third of every dynamic int8 build. ``vectorized_per_channel()`` swaps in the same arithmetic over
all channels at once while ORT's quantizer runs, and hands every case it does not cover (tensor
overrides, a minimum range, types other than 8-bit, empty weights) to ORT's own code. The result
is bit-identical to ORT's (tests compare both on the same weights); only the time differs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

_EIGHT_BIT: dict[int, type[np.integer[Any]]] = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
}


_lock = threading.Lock()
_users = 0  # compress runs inside the context at once (threads of one process share ORT's class)
_original: Any = None


@contextlib.contextmanager
def vectorized_per_channel() -> Iterator[None]:
    """While inside, ORT's quantizer quantizes 8-bit per-channel weights with ``_per_channel``.

    Reentrant and thread-safe: the first to enter patches ORT's class, the last to leave restores it.
    """
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    global _users, _original
    with _lock:
        if _users == 0:
            _original = BaseQuantizer.quantize_weight_per_channel_impl
            BaseQuantizer.quantize_weight_per_channel_impl = _patched  # type: ignore[method-assign]
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                BaseQuantizer.quantize_weight_per_channel_impl = _original  # type: ignore[method-assign]


def _patched(
    self: Any,
    weight_name: str,
    weight_qType: int,
    channel_axis: int,
    reduce_range: bool = True,
    keep_float_weight: bool = False,
) -> tuple[str, str, str]:
    done = _per_channel(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
    if done is None:
        return _original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)  # type: ignore[no-any-return]
    return done


def quantize_channels(
    weights: np.ndarray, qtype: int, axis: int, *, symmetric: bool, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantized weights, per-channel scales (float32) and zero points, as ORT computes them channel by channel."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range, symmetric=symmetric)
    others = tuple(i for i in range(weights.ndim) if i != axis)
    rmin = np.minimum(weights.min(axis=others), np.float32(0))
    rmax = np.maximum(weights.max(axis=others), np.float32(0))
    if symmetric:
        rmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin = -rmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (float(qmax) - float(qmin))
    tiny = scale < np.finfo(weights.dtype).tiny
    dtype = _EIGHT_BIT[qtype]
    if symmetric:
        zero = np.full(scale.shape, np.round((float(qmin) + float(qmax)) / 2.0), dtype=np.float64)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.round(float(qmin) - rmin / scale)
    zero = np.where(tiny, 0.0, zero).astype(dtype)
    stored = np.where(tiny, np.float32(1.0), scale.astype(weights.dtype)).astype(weights.dtype)
    shape = [1] * weights.ndim
    shape[axis] = -1
    full_min, full_max = get_qmin_qmax_for_qType(qtype, reduce_range=False, symmetric=False)
    q = (weights.astype(np.float32) / stored.reshape(shape)).round() + zero.reshape(shape)
    np.clip(q, full_min, full_max, out=q)
    return q.astype(dtype), stored, zero


def _per_channel(
    quantizer: Any, weight_name: str, qtype: int, axis: int, reduce_range: bool, keep_float: bool
) -> tuple[str, str, str] | None:
    """ORT's per-channel weight quantization for the cases it covers; None hands the weight back to ORT."""
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import (
        TENSOR_NAME_QUANT_SUFFIX,
        find_by_name,
        normalize_axis,
        tensor_proto_to_array,
    )

    initializer = find_by_name(weight_name, quantizer.model.initializer())
    if initializer is None or qtype not in _EIGHT_BIT or quantizer.min_real_range is not None:
        return None
    weights = tensor_proto_to_array(initializer)
    valid, axis = normalize_axis(axis, weights.ndim)
    if not valid or weights.size == 0 or weights.dtype != np.float32:
        return None
    overrides = quantizer.tensor_quant_overrides.get_per_channel_overrides(weight_name, default_val=None)
    if overrides:
        return None
    q, scale, zero = quantize_channels(
        weights,
        qtype,
        axis,
        symmetric=quantizer.is_weight_symmetric(qtype),
        reduce_range=quantizer.reduce_range and reduce_range,
    )
    names = (weight_name + TENSOR_NAME_QUANT_SUFFIX, weight_name + "_zero_point", weight_name + "_scale")
    dims = [initializer.dims[axis]]
    model: ONNXModel = quantizer.model
    model.initializer_extend(
        [
            onnx.helper.make_tensor(names[2], initializer.data_type, dims, scale.tolist()),
            onnx.helper.make_tensor(names[1], qtype, dims, zero.tolist()),
        ]
    )
    if not keep_float:
        model.initializer_extend([onnx.numpy_helper.from_array(q.reshape(initializer.dims), names[0])])
    return names
