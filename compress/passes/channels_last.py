"""Write the int8 convolutions of a QOperator graph channels-last, so ORT adds fewer layout Transposes.

ORT's CPU EP runs int8 convolutions in NHWC: at load, its NhwcTransformer flips each ``QLinearConv``
to channels-last, carries the layout through the ops that follow, and leaves a ``Transpose`` at
every border of that region (after the image is quantized, before a ``Flatten``, before the output).
On a small CNN each border is a node with its own dispatch and copy. This rewrite writes the region
channels-last in the file itself, with ORT's com.microsoft contrib ops (``QLinearConv`` and the
pools with ``channels_last``, ``NhwcMaxPool``), and closes the borders where the graph allows:

- a ``Flatten``/``Reshape`` to ``[N, C*H*W]`` whose readers are all matrix products with a constant
  weight (``QGemm``, ``QLinearMatMul``, ``Gemm``, ``MatMul``) reads the NHWC tensor as it is, and
  the weight's rows are permuted to the NHWC order;
- a ``Flatten``/``Reshape`` of a tensor with one pixel or one channel needs nothing (same bytes);
- a one-channel input enters through a ``Reshape`` (same bytes) instead of a ``Transpose``.

Every other border keeps a ``Transpose``. The rewritten graph computes the same integers as its
input, but only ORT's CPU EP has these contrib ops: the pass that uses it runs on CPU profiles only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgectl.compress.graph import probe_session

MS_DOMAIN = "com.microsoft"
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
_INT8 = (np.dtype(np.uint8), np.dtype(np.int8))
# Readers of a flattened tensor whose weight rows can take the NHWC order: op -> index of the weight.
_MATMULS = {"QGemm": 3, "QLinearMatMul": 3, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class Probe:
    """Every tensor's shape and element type on one sample, and whether the inputs fix them all."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    # Every graph input has static dims past the batch: the shapes seen here are the only ones.
    static: bool


@dataclass
class LayoutReport:
    """What the rewrite changed: nodes written channels-last and the borders left and closed."""

    converted: dict[str, int] = field(default_factory=dict)  # op type -> nodes written channels-last
    transposes: int = 0  # Transposes left at the region's borders
    reshapes: int = 0  # one-channel entries written as a Reshape
    weights_permuted: int = 0  # matrix weights whose rows now follow the NHWC order
    flattens_kept: int = 0  # Flatten/Reshape nodes that read an NHWC tensor directly

    @property
    def changed(self) -> bool:
        """Whether anything was written channels-last."""
        return bool(self.converted)

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return dict(self.__dict__)


def probe(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> Probe:
    """Run ``model`` once on ``feed`` with every tensor as an output: shapes ONNX inference cannot give
    past com.microsoft ops."""
    inits = {i.name for i in model.graph.initializer}
    tensors = sorted({o for n in model.graph.node for o in n.output if o} - inits)
    session, names = probe_session(model, tensors)
    values = dict(zip(names, session.run(None, feed), strict=True)) | feed
    arrays = {k: np.asarray(v) for k, v in values.items()}
    static = all(
        all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim[1:])
        for i in model.graph.input
        if i.name not in inits
    )
    return Probe({k: a.shape for k, a in arrays.items()}, {k: a.dtype for k, a in arrays.items()}, static)


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def activation_inputs(node: onnx.NodeProto) -> list[int]:
    """Input positions of ``node`` that carry its 4-D activations, if its op has a channels-last form."""
    op = node.op_type
    if op in ("QLinearConv", "QLinearAveragePool", "QLinearGlobalAveragePool", "MaxPool"):
        return [0]
    if op in ("QLinearLeakyRelu", "QLinearSigmoid"):
        return [0]
    if op in ("QLinearAdd", "QLinearMul"):
        return [0, 3]
    if op == "QLinearConcat":
        return list(range(2, len(node.input), 3))
    return []


class ChannelsLast:
    """One rewrite of one model (changed in place): choose the region, convert it, close its borders."""

    def __init__(self, model: onnx.ModelProto, facts: Probe) -> None:
        self.model, self.graph, self.facts = model, model.graph, facts
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.report = LayoutReport()

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.facts.shapes.get(name, ())

    def convertible(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` has a channels-last form that computes the same integers."""
        op, ins = node.op_type, activation_inputs(node)
        if not ins or len(self._shape(node.output[0])) != 4:
            return False
        if any(len(self._shape(node.input[i])) != 4 for i in ins):
            return False
        if op == "QLinearConv":
            return node.domain in ("", "ai.onnx", MS_DOMAIN) and self.facts.dtypes.get(node.input[0]) in _INT8
        if op == "MaxPool":  # NhwcMaxPool has no Indices output and no column-major storage
            return (
                len([o for o in node.output if o]) == 1
                and _attr(node, "storage_order") == 0
                and self.facts.dtypes.get(node.input[0]) in _INT8
            )
        if node.domain != MS_DOMAIN:
            return False
        if op in ("QLinearAdd", "QLinearMul"):  # no broadcast along an axis the layout moves
            return {self._shape(node.input[i]) for i in ins} == {self._shape(node.output[0])}
        return True

    def region(self) -> list[onnx.NodeProto]:
        """The convertible nodes linked to an int8 convolution through convertible nodes, in graph order."""
        chosen = {id(n) for n in self.graph.node if n.op_type == "QLinearConv" and self.convertible(n)}
        grown = bool(chosen)
        while grown:
            grown = False
            for node in self.graph.node:
                if id(node) in chosen or not self.convertible(node):
                    continue
                touched = [node.input[i] for i in activation_inputs(node)] + [node.output[0]]
                neighbours = [self.producer.get(t) for t in touched]
                neighbours += [r for t in touched for r in self.readers.get(t, [])]
                if any(n is not None and id(n) in chosen for n in neighbours):
                    chosen.add(id(node))
                    grown = True
        return [n for n in self.graph.node if id(n) in chosen]

    def apply(self) -> LayoutReport:
        """Rewrite the region channels-last and close its borders."""
        nodes = self.region()
        for node in nodes:
            self.report.converted[node.op_type] = self.report.converted.get(node.op_type, 0) + 1
            _convert(node)
        inside = {id(n) for n in nodes}
        nhwc_in = {n.input[i] for n in nodes for i in activation_inputs(n)}
        nhwc_out = {n.output[0] for n in nodes}
        for name in sorted(nhwc_in - nhwc_out):
            self._entry(name, [r for r in self.readers.get(name, []) if id(r) in inside])
        for name in sorted(nhwc_out):
            self._exit(name, [r for r in self.readers.get(name, []) if id(r) not in inside])
        if nodes:
            _finish(self.model)
        return self.report

    def _add_init(self, value: np.ndarray, name: str) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(value, name)
            self.graph.initializer.append(self.inits[name])
        return name

    def _entry(self, name: str, inside: list[onnx.NodeProto]) -> None:
        """Give the region's readers of the NCHW tensor ``name`` its NHWC form."""
        _, c, h, w = self._shape(name)
        nhwc = f"{name}_nhwc"
        if c == 1 and self.facts.static:  # [N, 1, H, W] and [N, H, W, 1] hold the same bytes
            shape = self._add_init(np.array([-1, h, w, 1], np.int64), f"{nhwc}_shape")
            self.graph.node.append(helper.make_node("Reshape", [name, shape], [nhwc], name=nhwc))
            self.report.reshapes += 1
        else:
            self.graph.node.append(helper.make_node("Transpose", [name], [nhwc], name=nhwc, perm=TO_NHWC))
            self.report.transposes += 1
        for reader in inside:
            for i in activation_inputs(reader):
                if reader.input[i] == name:
                    reader.input[i] = nhwc

    def _exit(self, name: str, outside: list[onnx.NodeProto]) -> None:
        """Give the readers outside the region, and the graph output, the NCHW tensor they expect."""
        rest = [r for r in outside if not self._reads_nhwc(name, r)]
        if not rest and name not in self.outputs:
            return
        nhwc = name
        if name in self.outputs:  # the output keeps its name: the region now writes a renamed tensor
            nhwc = f"{name}_nhwc"
            self.producer[name].output[0] = nhwc
            moved = [r for r in self.readers.get(name, []) if all(r is not x for x in rest)]
            for reader in moved:
                reader.input[:] = [nhwc if x == name else x for x in reader.input]
            nchw = name
        else:
            nchw = f"{name}_nchw"
            for reader in rest:
                reader.input[:] = [nchw if x == name else x for x in reader.input]
        self.graph.node.append(helper.make_node("Transpose", [nhwc], [nchw], name=nchw, perm=TO_NCHW))
        self.report.transposes += 1

    def _reads_nhwc(self, name: str, reader: onnx.NodeProto) -> bool:
        """Whether ``reader`` can take the NHWC tensor as it is (its readers' weights permuted if needed)."""
        if not self._flattens(reader):
            return False
        _, c, h, w = self._shape(name)
        producer = self.producer[name]
        one_pixel = h * w == 1 and (self.facts.static or producer.op_type == "QLinearGlobalAveragePool")
        if one_pixel or (c == 1 and self.facts.static):
            self.report.flattens_kept += 1
            return True
        flat = reader.output[0]
        users = self.readers.get(flat, [])
        weights = [self._weight_rows(u) for u in users]
        if not self.facts.static or not users or flat in self.outputs or None in weights:
            return False
        order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
        for user, (index, axis) in zip(users, [w for w in weights if w is not None], strict=True):
            weight = numpy_helper.to_array(self.inits[user.input[index]])
            # Named by the order: a weight shared by two flattens of other shapes gets two copies.
            name_rows = f"{user.input[index]}_rows_hwc{h}x{w}x{c}"
            user.input[index] = self._add_init(np.take(weight, order, axis=axis), name_rows)
            self.report.weights_permuted += 1
        self.report.flattens_kept += 1
        return True

    def _flattens(self, node: onnx.NodeProto) -> bool:
        """A Flatten at axis 1, or a Reshape to ``[N, C*H*W]`` by a constant shape that copies no input dim."""
        if node.op_type == "Flatten":
            return _attr(node, "axis", 1) == 1
        out, inp = self._shape(node.output[0]), self._shape(node.input[0])
        if node.op_type != "Reshape" or len(out) != 2 or node.input[1] not in self.inits:
            return False
        target = numpy_helper.to_array(self.inits[node.input[1]]).ravel()
        if target.size != 2 or not inp or out[0] != inp[0]:
            return False
        return _attr(node, "allowzero") != 0 or int(target[1]) != 0  # a 0 would copy the channel count

    def _weight_rows(self, node: onnx.NodeProto) -> tuple[int, int] | None:
        """(input index, axis) of the reduction rows of a matrix product's constant 2-D weight, else None."""
        index = _MATMULS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in self.inits:
            return None
        if len(self.inits[node.input[index]].dims) != 2 or _attr(node, "transA"):
            return None
        if node.op_type in ("QGemm", "QLinearMatMul") and node.domain not in ("", MS_DOMAIN):
            return None
        return index, 1 if node.op_type in ("QGemm", "Gemm") and _attr(node, "transB") else 0


def _convert(node: onnx.NodeProto) -> None:
    """Switch one region node to its channels-last form (its weights keep their OIHW layout)."""
    op = node.op_type
    if op == "QLinearConv":
        node.domain = MS_DOMAIN
        _set_attr(node, "channels_last", 1)
    elif op == "MaxPool":
        node.op_type, node.domain = "NhwcMaxPool", MS_DOMAIN
        keep = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")
        attrs = [a for a in node.attribute if a.name in keep]
        del node.attribute[:]
        node.attribute.extend(attrs)
        del node.output[1:]
    elif op in ("QLinearAveragePool", "QLinearGlobalAveragePool"):
        _set_attr(node, "channels_last", 1)
    elif op == "QLinearConcat":
        _set_attr(node, "axis", TO_NHWC.index(_attr(node, "axis") % 4))


def _finish(model: onnx.ModelProto) -> None:
    """Order the nodes again, drop stale shapes and weights nothing reads, declare the contrib domain."""
    graph = model.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(x in known for x in n.input)]
        if not ready:
            raise ValueError("the rewritten graph reads a tensor nothing writes")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]  # tensors now NHWC carry NCHW shapes there: ORT infers them again
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def write_channels_last(model: onnx.ModelProto, facts: Probe) -> LayoutReport:
    """Rewrite ``model`` in place with its int8 convolution region channels-last; returns what changed."""
    return ChannelsLast(model, facts).apply()
