"""Linear-layer Gemms written as MatMul (+ Add): the form ORT's dynamic and weight-only quantizers read.

torch exports ``nn.Linear`` on a 2-D input as ``Gemm(A, W, b, transB=1)``. ORT's weight-only
quantizer (``MatMulNBits``) reads only MatMul, and its dynamic quantizer turns a Gemm into a MatMul
only when alpha = beta = 1: a plain MLP or classifier head would get nothing from the weight-only modes.
Here each Gemm with a constant 2-D weight becomes ``MatMul(A, alpha * op(B))`` followed by
``Add(beta * C)`` when it has a C: the same product (bit for bit when alpha = beta = 1, else within
one float rounding of the folded constants). The MatMul keeps the Gemm's node name, so exclusions
and sensitivity rankings that name the Gemm still apply to it.

Static int8 never reads this form: ORT quantizes Gemm itself there (QGemm, or QDQ around Gemm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Modes whose quantizer reads linear layers as MatMul only.
MATMUL_MODES = frozenset({"int8-dynamic", "int8-weight", "int4-weight"})
# Weight types the rewrite folds alpha into (numpy has no bfloat16).
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class LinearGemm:
    """One Gemm that is a linear layer: its node and the attributes to fold into its constants."""

    node: onnx.NodeProto
    alpha: float
    beta: float
    trans_b: bool

    @property
    def has_c(self) -> bool:
        """Whether the Gemm adds a C."""
        return len(self.node.input) > 2 and bool(self.node.input[2])

    @property
    def dynamic_reads_it(self) -> bool:
        """Whether ORT's dynamic quantizer turns this Gemm into a MatMul itself (only when alpha = beta = 1)."""
        return self.alpha == 1.0 and self.beta == 1.0


def linear_gemms(model: onnx.ModelProto) -> list[LinearGemm]:
    """The main graph's Gemms that multiply by a constant 2-D float weight, with A untransposed.

    A Gemm whose C is a graph tensor qualifies only when beta = 1 (the Add then reads C as it is).
    ``transA = 1`` is left alone: no linear layer exports it, and it would cost a Transpose per run.
    Reads no tensor data: works on a model loaded without its external data.
    """
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = inits.get(node.input[1])
        if attrs.get("transA", 0) or b is None or len(b.dims) != 2 or b.data_type not in _FLOAT_TYPES:
            continue
        c_name = node.input[2] if len(node.input) > 2 else ""
        c = inits.get(c_name)
        beta = float(attrs.get("beta", 1.0))
        if c_name and (c is None or c.data_type != b.data_type) and beta != 1.0:
            continue
        alpha = float(attrs.get("alpha", 1.0))
        out.append(LinearGemm(node, alpha, beta, bool(attrs.get("transB", 0))))
    return out


def gemms_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrite every linear-layer Gemm of ``model`` as MatMul (+ Add) in place; returns how many."""
    found = linear_gemms(model)
    if not found:
        return 0
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    taken |= {n.name for n in graph.node}
    folded: dict[tuple[str, str, bool, float], str] = {}  # one folded copy per (tensor, transform)

    def constant(source: str, tag: str, transposed: bool, factor: float) -> str:
        key = (source, tag, transposed, factor)
        if key not in folded:
            value = numpy_helper.to_array(inits[source])
            array = value.T if transposed else value
            if factor != 1.0:
                array = array * np.asarray(factor, dtype=value.dtype)
            name = _fresh(f"{source}_{tag}", taken)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, value.dtype), name))
            folded[key] = name
        return folded[key]

    by_node = {id(g.node): g for g in found}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        g = by_node.get(id(node))
        if g is None:
            nodes.append(node)
            continue
        a, b, y = node.input[0], node.input[1], node.output[0]
        w = constant(b, "matmul", g.trans_b, g.alpha) if g.trans_b or g.alpha != 1.0 else b
        name = node.name or _fresh("Gemm", taken)
        if not g.has_c:
            nodes.append(helper.make_node("MatMul", [a, w], [y], name=name))
            continue
        c = constant(node.input[2], "bias", False, g.beta) if g.beta != 1.0 else node.input[2]
        product = _fresh(f"{y}_matmul", taken)
        nodes.append(helper.make_node("MatMul", [a, w], [product], name=name))
        nodes.append(helper.make_node("Add", [product, c], [y], name=_fresh(f"{name}_bias", taken)))
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    return len(found)


def write_gemms_as_matmul(src: Path, dst: Path) -> int:
    """Write ``src`` with its linear-layer Gemms as MatMul (+ Add) to ``dst``; returns how many (0: nothing written)."""
    if not linear_gemms(onnx.load(str(src), load_external_data=False)):
        return 0  # the common case (no Gemm): the weights are never read
    model = onnx.load(str(src))
    count = gemms_as_matmul(model)
    onnx.save(model, str(dst))
    return count


def has_weight_matmul(model: onnx.ModelProto) -> bool:
    """Whether some MatMul multiplies by a constant 2-D weight."""
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    return any(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)


def has_linear_weights(model_path: Path) -> bool:
    """Whether some MatMul or linear-layer Gemm multiplies by a constant 2-D weight (what weight-only quantizes)."""
    model = onnx.load(str(model_path), load_external_data=False)
    return has_weight_matmul(model) or bool(linear_gemms(model))


def rewrite_changes(model_path: Path, mode: str) -> bool:
    """Whether quantizing in ``mode`` with the Gemms as they are gives a third model, other than the
    rewrite's and the float one: then both are built and the faster kept (a rewrite must not be slower).

    Dynamic int8 differs only where ORT would leave a Gemm float (alpha or beta not 1); weight-only
    with the Gemms kept quantizes the MatMuls alone, and is the float model when there are none.
    """
    if mode not in MATMUL_MODES:
        return False
    model = onnx.load(str(model_path), load_external_data=False)
    gemms = linear_gemms(model)
    if mode == "int8-dynamic":
        return any(not g.dynamic_reads_it for g in gemms)
    return bool(gemms) and has_weight_matmul(model)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads any more (a rewrite's replaced weights, a folded node's scales)."""
    used = _names_read(model.graph) | {o.name for o in model.graph.output}
    dropped = {i.name for i in model.graph.initializer if i.name not in used}
    if not dropped:
        return
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    # Old exports list initializers as graph inputs too: a dropped one must not become a required input.
    inputs = [v for v in model.graph.input if v.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If, Loop, Scan bodies) reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _names_read(sub)
    return names
