"""How much each node's quantization alone hurts: the ranking mixed precision keeps float from.

``rank_nodes`` quantizes each candidate node *alone*, in simulation (its activation input
fake-quantized the way the chosen config would, its weight per channel), runs just that node in
ORT and measures the relative output error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import run_model
from edgectl.compress.graph import cpu_session
from edgectl.compress.quantizer import QuantConfig

# Ops ORT's quantizer turns into integer kernels: the only ones where keeping float changes anything.
_QUANTIZABLE = ("Conv", "Gemm", "MatMul", "Gather")


@dataclass(frozen=True)
class NodeSensitivity:
    """One node's relative output error when it alone is quantized."""

    node: str
    op_type: str
    error: float
    params: int = 0

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return {
            "node": self.node,
            "op_type": self.op_type,
            "relative_error": round(self.error, 6),
            "params": self.params,
        }


def _fake_quant(x: np.ndarray, *, signed: bool, bits: int = 8, axis: int | None = None) -> np.ndarray:
    """Quantize and dequantize ``x``: symmetric when ``signed`` (weights), else asymmetric uint8."""
    if axis is not None:
        moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        amax = np.abs(moved).max(axis=1, keepdims=True)
        qmax = 2 ** (bits - 1) - 1
        scale = np.where(amax > 0, amax / qmax, 1.0)
        q = np.clip(np.round(moved / scale), -qmax, qmax) * scale
        back: np.ndarray = np.moveaxis(q.reshape(np.moveaxis(x, axis, 0).shape), 0, axis)
        return back.astype(x.dtype)
    if signed:
        step = (float(np.abs(x).max()) or 1.0) / 127.0
        return (np.clip(np.round(x / step), -127, 127) * step).astype(x.dtype)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255.0 or 1.0
    zero = float(np.round(-lo / step))
    out: np.ndarray = (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step
    return out.astype(x.dtype)


def _candidates(model: onnx.ModelProto, config: QuantConfig) -> list[onnx.NodeProto]:
    inits = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in _QUANTIZABLE or not node.name:
            continue
        has_weight = (node.input[0] in inits) if node.op_type == "Gather" else (node.input[1] in inits)
        # Dynamic quantization only touches MatMuls with a constant B (ORT's MatMulConstBOnly).
        if has_weight or (config.mode == "int8-static" and node.op_type == "MatMul"):
            out.append(node)
    return out


def rank_nodes(
    model_path: Path, data: SampleSet, config: QuantConfig, *, samples: int = 8
) -> list[NodeSensitivity]:
    """Quantizable nodes of the float model, most sensitive first."""
    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = _candidates(model, config)
    if not nodes:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = sorted({i for n in nodes for i in n.input if i and i not in inits})
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in wanted if t not in known])
    session = cpu_session(probe.SerializeToString(), threads=0)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, run_model(session, data.take(samples), batch=samples), strict=True))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    signed_act = config.activations == "s8"
    bits = 7 if config.reduce_range else 8
    ranked = []
    for node in nodes:
        feeds: dict[str, np.ndarray] = {}
        quant: dict[str, np.ndarray] = {}
        consts: list[onnx.TensorProto] = []
        for pos, name in enumerate(node.input):
            if not name:
                continue
            if name in inits:
                w = numpy_helper.to_array(inits[name])
                is_weight = (pos == 1 and node.op_type != "Gather") or (pos == 0 and node.op_type == "Gather")
                if is_weight and w.dtype.kind == "f":
                    # Per channel: Conv filters on axis 0, MatMul/Gemm columns on the last axis.
                    axis = (0 if node.op_type == "Conv" else w.ndim - 1) if config.per_channel else None
                    if node.op_type == "Gather":
                        axis = None  # ORT quantizes embedding tables per tensor
                    w = (
                        _fake_quant(w, signed=True, bits=bits, axis=axis)
                        if axis is not None
                        else (_fake_quant(w, signed=config.weights == "s8" or node.op_type != "Gather"))
                    )
                consts.append(numpy_helper.from_array(w, name))
            else:
                x = np.asarray(values[name])
                feeds[name] = x
                quant[name] = _fake_quant(x, signed=signed_act) if x.dtype.kind == "f" else x
        single = helper.make_model(
            helper.make_graph(
                [node],
                "probe",
                [
                    helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for n, v in feeds.items()
                ],
                [helper.make_empty_tensor_value_info(node.output[0])],
                consts,
            ),
            opset_imports=[helper.make_opsetid("", opset)],
        )
        float_consts = [
            numpy_helper.from_array(numpy_helper.to_array(inits[n]), n) for n in node.input if n in inits
        ]
        reference = onnx.ModelProto()
        reference.CopyFrom(single)
        del reference.graph.initializer[:]
        reference.graph.initializer.extend(float_consts)
        want = cpu_session(reference.SerializeToString(), threads=0).run(None, feeds)[0]
        got = cpu_session(single.SerializeToString(), threads=0).run(None, quant)[0]
        denom = float(np.linalg.norm(want)) or 1.0
        params = sum(int(np.prod(inits[n].dims)) for n in node.input if n in inits)
        ranked.append(
            NodeSensitivity(node.name, node.op_type, float(np.linalg.norm(got - want)) / denom, params)
        )
    return sorted(ranked, key=lambda s: -s.error)
