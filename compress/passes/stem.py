"""The stem of an image CNN under static int8: its first convolution, which reads the 3-channel image.

ORT runs int8 convolutions in NHWC (MLAS's QLinearConv), where a 3-channel input makes every
im2col row 3 bytes wide: the stem is one of the slowest layers of the int8 model although it holds
a sliver of its work. Two rewrites the quantizer's peers do not make, each a candidate that is kept
only when timed faster on the target:

- ``pad``: zero-pad the image to a multiple of 4 channels (one Pad node, zero weights for the new
  channels): the output is the same, the int8 kernel gets aligned 4-byte groups (what VNNI multiplies).
  After quantization the Pad moves behind the image's QuantizeLinear (``quantize_before_pad``).
- ``float``: leave the stem conv and its activation in float (ORT's NCHWc kernel), quantize after it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Channel counts the stem is padded to a multiple of: VNNI multiplies groups of 4 int8 values.
CHANNEL_ALIGN = 4
# An input with more channels than this is a feature map, not an image: no stem rewrite.
MAX_STEM_CHANNELS = 4
# Activations that ORT's quantizer folds into the conv before them: they stay with a float stem.
_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid")


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def stem_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Plain (group 1) 2-D convolutions reading a float graph input of at most 4 channels directly."""
    inits = {i.name: i for i in model.graph.initializer}
    inputs = {
        i.name
        for i in model.graph.input
        if i.name not in inits and i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    out = []
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if (
            weight is not None
            and node.input[0] in inputs
            and len(weight.dims) == 4
            and _attr(node, "group", 1) == 1
            and weight.dims[1] <= MAX_STEM_CHANNELS
        ):
            out.append(node)
    return out


def float_stem_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the stem convs and of the activation each feeds alone: what a float stem keeps float."""
    stems = stem_convs(model)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    names = []
    for conv in stems:
        names.append(conv.name)
        after = users.get(conv.output[0], [])
        if len(after) == 1 and after[0].op_type in _ACTIVATIONS:
            names.append(after[0].name)
    return [n for n in names if n]


def pad_stem_channels(src: Path, dst: Path) -> int:
    """Write ``src`` with each stem's input zero-padded to a multiple of 4 channels; returns how many.

    The stem's weights get zero columns for the new channels, so every output is unchanged. Needs
    opset >= 11 (Pad with its pads as an input); an older model is written unchanged.
    """
    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {i.name: i for i in model.graph.initializer}
    stems = [n for n in stem_convs(model) if inits[n.input[1]].dims[1] % CHANNEL_ALIGN]
    if opset < 11 or not stems:
        onnx.save(model, str(dst))
        return 0
    padded_inputs: dict[tuple[str, int], str] = {}
    pads_nodes: list[onnx.NodeProto] = []
    for conv in stems:
        weight = numpy_helper.to_array(inits[conv.input[1]])
        channels = _padded(weight.shape[1])
        key = (conv.input[0], channels)
        if key not in padded_inputs:
            name = f"{conv.input[0]}_pad{channels}"
            pads = np.zeros(8, np.int64)
            pads[5] = channels - weight.shape[1]  # end of axis 1 (channels), NCHW
            model.graph.initializer.append(numpy_helper.from_array(pads, name + "_pads"))
            pads_nodes.append(helper.make_node("Pad", [conv.input[0], name + "_pads"], [name], name=name))
            padded_inputs[key] = name
        wide = np.zeros((weight.shape[0], channels, *weight.shape[2:]), weight.dtype)
        wide[:, : weight.shape[1]] = weight
        # A new initializer: another node may share the original weight.
        wide_name = f"{conv.input[1]}_cin{channels}"
        model.graph.initializer.append(numpy_helper.from_array(wide, wide_name))
        conv.input[0], conv.input[1] = padded_inputs[key], wide_name
    for i, node in enumerate(pads_nodes):
        model.graph.node.insert(i, node)
    used = {name for node in model.graph.node for name in node.input} | {i.name for i in model.graph.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    onnx.save(model, str(dst))
    return len(stems)


def _padded(channels: int) -> int:
    return -(-channels // CHANNEL_ALIGN) * CHANNEL_ALIGN


def quantize_before_pad(path: Path) -> int:
    """In a quantized model, move each stem Pad after the QuantizeLinear it feeds; returns how many.

    ORT's quantizer leaves the Pad on the graph input in float and quantizes its output; padding the
    quantized image instead (with the zero point, which is the quantized 0.0) moves a quarter of the
    bytes and gives the same tensor.
    """
    model = onnx.load(str(path))
    graph_inputs = {i.name for i in model.graph.input}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    scalars = {i.name: len(i.dims) == 0 for i in model.graph.initializer}
    moved = 0
    for pad in [n for n in model.graph.node if n.op_type == "Pad" and n.input[0] in graph_inputs]:
        after = users.get(pad.output[0], [])
        if (
            len(after) != 1
            or after[0].op_type != "QuantizeLinear"
            or pad.output[0] in outputs
            or len(pad.input) != 2  # pads as an input (opset >= 11), no constant value of its own
        ):
            continue
        quant = after[0]
        if len(quant.input) < 3 or scalars.get(quant.input[2]) is not True:
            continue  # the quantized image is padded with the zero point: one, per tensor
        quantized = quant.output[0]
        quant.input[0], quant.output[0] = pad.input[0], f"{pad.input[0]}_quantized_unpadded"
        pad.input[0] = quant.output[0]
        pad.input.append(quant.input[2])  # constant_value: the zero point, i.e. a quantized 0.0
        pad.output[0] = quantized
        nodes = list(model.graph.node)
        nodes.remove(quant)
        nodes.insert(nodes.index(pad), quant)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        moved += 1
    if moved:
        onnx.save(model, str(path))
    return moved
