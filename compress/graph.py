"""Facts about an ONNX graph: its signature, parameter count and MACs, and how to open it in ORT."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from edgectl.artifact import TensorSpec
from edgectl.artifact.tensors import dynamic_dim_name
from edgectl.compress.errors import BadInputError


@dataclass(frozen=True)
class ModelStats:
    """Size on disk, number of weights and multiply-accumulates for one sample."""

    size_bytes: int
    params: int
    macs: int


def load(path: Path) -> onnx.ModelProto:
    """Load an ONNX file, turning anything that is not one into a BadInputError."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ... for a non-model
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise BadInputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}{': ' + detail if detail else ''})",
            hint="pass a .onnx file, a .pt2 torch.export file or package.module:factory",
        ) from exc
    if not model.graph.node:
        raise BadInputError(f"{path} holds no ONNX graph", hint="pass a .onnx file exported from your model")
    return model


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer keeps its bytes in a file beside the graph (loaded without them)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer) or any(
        a.t.data_location == onnx.TensorProto.EXTERNAL
        for n in model.graph.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.TENSOR
    )


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tt = value.type.tensor_type
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or dynamic_dim_name(i)))
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    return TensorSpec(value.name, dtype, tuple(dims))


def signature(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's real inputs (initializers excluded) and outputs."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_spec(v) for v in model.graph.output]


# Ops that compute on int8 (ORT's quantized forms of the compute nodes).
INT8_COMPUTE_OPS = frozenset({
    "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
    "QAttention", "DynamicQuantizeLSTM", "MatMulIntegerToFloat",
})  # fmt: skip
# Ops only a quantizer writes: a graph holding any of them was quantized already.
_QUANTIZED_OPS = INT8_COMPUTE_OPS | {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulNBits",
}


def quantized_ops(path: Path) -> dict[str, int]:
    """How many nodes of each quantized op type the model at ``path`` holds (empty for a float model)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in _QUANTIZED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def count_params(model: onnx.ModelProto) -> int:
    """Number of weight elements stored in the graph's initializers."""
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


# Initializers up to this many elements are kept in the graph shape inference reads (shape constants).
_SMALL_CONSTANT = 64


def _shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every tensor for this feed, by ONNX shape inference on fixed inputs."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    # Weights matter to inference by their shapes only: as typed inputs they are not serialized
    # through the checker (a 90 MB model costs seconds). Small constants stay: shapes are computed from them.
    big = [i for i in fixed.graph.initializer if int(np.prod(i.dims)) > _SMALL_CONSTANT]
    named = {i.name for i in fixed.graph.input}  # before IR 4, initializers are inputs too
    for init in (i for i in big if i.name not in named):
        fixed.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    keep = [i for i in fixed.graph.initializer if int(np.prod(i.dims)) <= _SMALL_CONSTANT]
    del fixed.graph.initializer[:]
    fixed.graph.initializer.extend(keep)
    for value in fixed.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, feed[value.name].shape, strict=False):
                d.Clear()
                d.dim_value = int(n)
    try:
        inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # shape inference is best effort: a model it cannot follow still runs
        inferred = fixed
    shapes: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def count_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul nodes for this feed (others are cheap)."""
    shapes = _shapes(model, feed)
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[3 if node.op_type == "QLinearConv" else 1])
            if w is not None:
                macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "MatMulInteger", "Gemm", "DynamicQuantizeMatMul", "QLinearMatMul"):
            a = shapes.get(node.input[0])
            if a is not None:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                macs += int(np.prod(out)) * int(a[-2] if trans_a else a[-1])
    return macs


def model_stats(path: Path, feed: dict[str, np.ndarray]) -> ModelStats:
    """Size, parameters and MACs of the model file at ``path``."""
    model = onnx.load(str(path))
    return ModelStats(path.stat().st_size, count_params(model), count_macs(model, feed))


def model_params(path: Path) -> int:
    """Weight elements of the model file at ``path``, read from the initializers' dims only."""
    model = onnx.load(str(path), load_external_data=False)
    return count_params(model)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All initializers as numpy arrays, by name."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def cpu_session(path: Path | bytes, *, threads: int = 1, providers: tuple[str, ...] = ()) -> Any:
    """An ORT session pinned to ``threads`` intra-op threads (1 for comparable timings)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    target = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(target, opts, providers=list(providers) or ["CPUExecutionProvider"])


def probe_session(model: onnx.ModelProto, tensors: Iterable[str]) -> tuple[Any, list[str]]:
    """A CPU session on a copy of ``model`` that also outputs the intermediate ``tensors``, and the
    names of its outputs in the order ``run`` returns them."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in tensors if t not in known])
    session = cpu_session(probe.SerializeToString(), threads=0)
    return session, [o.name for o in session.get_outputs()]
