"""A transformer's residual Add + LayerNormalization kept as two standard ops, never SkipLayerNormalization.

ORT fuses ``Add -> LayerNormalization`` into its contrib op SkipLayerNormalization twice over: in
its python transformer fusions, and again at session load whenever both Add inputs have known,
equal 3-D shapes (the shapes clean-up infers, or the ones a dynamo export carries). On the CPU EP
that kernel is several times slower than Add + LayerNormalization (ORT 1.32, one thread, x86 with
AVX-512: 4-6x at 256-768 wide), which cost a BERT-like encoder 8-14 % of its latency, float and
int8 alike. Written as ``Sum``, the residual add is the same arithmetic and matches neither fusion.
"""

from __future__ import annotations

import onnx
from onnx import helper

# The contrib op's default epsilon (ORT's kDefaultSkipLayerNormEpsilon).
_SKIP_EPSILON = 1e-12
_MS = "com.microsoft"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _consumers(model: onnx.ModelProto) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            count[name] = count.get(name, 0) + 1
    for out in model.graph.output:
        count[out.name] = count.get(out.name, 0) + 2  # a graph output is never fused away
    return count


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    return names | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def _unfuse(model: onnx.ModelProto, uses: dict[str, int]) -> int:
    """SkipLayerNormalization -> [Add bias] + Sum + LayerNormalization, where only its sums are read."""
    new: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        outs = list(node.output) + [""] * (4 - len(node.output))
        if (
            node.op_type != "SkipLayerNormalization"
            or node.domain != _MS
            or any(uses.get(o) for o in outs[1:3] if o)
        ):
            new.append(node)  # mean / inverse std dev read by someone: not the plain op
            continue
        x, skip, gamma, beta, bias = (list(node.input) + [""] * 5)[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), _SKIP_EPSILON)
        if bias:
            new.append(helper.make_node("Add", [x, bias], [f"{node.name}_biased"], name=f"{node.name}_bias"))
            x = f"{node.name}_biased"
        total = outs[3] or f"{node.name}_sum"
        new.append(helper.make_node("Sum", [x, skip], [total], name=f"{node.name}_residual"))
        norm_in = [total, gamma, beta] if beta else [total, gamma]
        new.append(
            helper.make_node("LayerNormalization", norm_in, [outs[0]], name=node.name, axis=-1, epsilon=eps)
        )
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new)
    return count


def keep_residual_unfused(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place so no SkipLayerNormalization is left or made; the residual adds changed.

    A residual Add (both inputs computed, its output read only by a LayerNormalization) becomes a
    Sum; a SkipLayerNormalization already in the graph is split back (from opset 17, where
    LayerNormalization is a standard op).
    """
    count = 0
    if _opset(model) >= 17:
        count += _unfuse(model, _consumers(model))
    uses, constant = _consumers(model), _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        add = producer.get(node.input[0])
        if (
            add is not None
            and add.op_type == "Add"
            and add.domain in ("", "ai.onnx")
            and uses.get(add.output[0]) == 1
            and not any(i in constant for i in add.input)
        ):
            add.op_type = "Sum"
            count += 1
    return count


def residual_as_add(model: onnx.ModelProto) -> int:
    """Undo ``keep_residual_unfused``'s Sums in place (ORT then fuses SkipLayerNormalization at load
    wherever the shapes allow): the variant clean-up times against it. Returns the adds restored."""
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        total = producer.get(node.input[0])
        if total is not None and total.op_type == "Sum" and len(total.input) == 2:
            total.op_type = "Add"
            count += 1
    return count
