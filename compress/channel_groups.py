"""Which channels of an ONNX graph must be pruned together: dependency groups for structured pruning.

A residual Add ties its operands' channels together, a depthwise conv passes its input channels
through, and the Linear/MatMul after a Flatten owns ``H*W`` weight columns per channel. A group
that reaches a graph output or an op we cannot follow carries the reason in ``problem``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

# Ops that map channel c of their input to channel c of their output.
_CHANNELWISE = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Softplus", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Exp",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, and every weight slice that removing one implies."""

    channels: int
    producers: list[str] = field(default_factory=list)  # Conv weight inits: filters on axis 0
    biases: list[str] = field(default_factory=list)  # producer biases: axis 0
    params: list[str] = field(default_factory=list)  # per-channel params (BN, depthwise, scales): axis 0
    # A broadcast constant's channel axis where it is not 0: (1, C, 1, 1) or (C, 1, 1) -> ndim - 3.
    param_axes: dict[str, int] = field(default_factory=dict)
    depthwise: list[onnx.NodeProto] = field(default_factory=list)  # their `group` attribute shrinks
    consumers: list[tuple[onnx.NodeProto, str, int, int]] = field(
        default_factory=list
    )  # node, weight, axis, hw
    reshapes: list[tuple[str, int]] = field(default_factory=list)  # (shape init, hw) after a Flatten
    problem: str | None = None


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in model.graph.output}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[int]] = {}
        for v in [*inferred.graph.value_info, *inferred.graph.output]:
            self.shapes[v.name] = [
                d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
            ]

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def attr(self, node: onnx.NodeProto, name: str, default: int) -> int:
        return next((int(a.i) for a in node.attribute if a.name == name), default)


def _is_depthwise(g: _Graph, node: onnx.NodeProto) -> bool:
    w = g.inits.get(node.input[1])
    return (
        w is not None
        and g.attr(node, "group", 1) > 1
        and w.dims[1] == 1
        and g.attr(node, "group", 1) == w.dims[0]
    )


def _rank(g: _Graph, tensor: str) -> int:
    """The rank shape inference gave ``tensor``; 4 (NCHW) where it gave none."""
    shape = g.shapes.get(tensor)
    return len(shape) if shape else 4


def _reduce_axes(g: _Graph, node: onnx.NodeProto) -> list[int] | None:
    # Opset 18 moved `axes` from an attribute to an input. Negative axes count from the input's rank
    # (3 for a Conv1d's N, C, L).
    rank = _rank(g, node.input[0])
    if len(node.input) > 1 and node.input[1]:
        axes = g.const(node.input[1])
        return None if axes is None else [int(a) % rank for a in axes.ravel()]
    attr = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    return None if attr is None else [int(a) % rank for a in attr]


def _broadcasts(shape: list[int], out: list[int] | None, channels: int) -> bool:
    """Whether a computed operand of shape ``shape`` is broadcast over the channel axis of ``out``."""
    if out is not None and len(shape) != len(out):
        return True
    return len(shape) < 2 or shape[1] not in (channels, -1)


def _grow(g: _Graph, seed: str, channels: int) -> tuple[ChannelGroup, set[str]]:
    """Close the set of tensors sharing ``seed``'s channel axis, forwards and backwards."""
    group = ChannelGroup(channels)
    seen: set[str] = set()
    todo = [seed]
    flat: dict[str, int] = {}  # flattened tensors in the group -> spatial size per channel

    def fail(why: str) -> None:
        group.problem = group.problem or why

    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.outputs:
            fail(f"{t} is a graph output")
        # Backwards: who made this tensor?
        node = g.producer.get(t)
        if node is None:
            fail(f"{t} is a graph input")
        elif t in flat:
            pass  # made by the Flatten/Reshape we came through
        elif node.op_type == "Conv" and not _is_depthwise(g, node):
            if g.attr(node, "group", 1) != 1:
                fail(f"grouped conv {node.name}")
            elif node.input[1] not in g.inits:
                fail(f"conv {node.name}'s weight is computed, not a stored tensor")
            elif node.input[1] not in group.producers:
                group.producers.append(node.input[1])
                if len(node.input) > 2 and node.input[2]:
                    group.biases.append(node.input[2])
        elif node.op_type == "Conv":
            if node not in group.depthwise:
                group.depthwise.append(node)
                group.params += [i for i in node.input[1:] if i]
                todo.append(node.input[0])
        elif node.op_type in _CHANNELWISE or node.op_type in ("ReduceMean", "ReduceMax"):
            todo.append(node.input[0])
        elif node.op_type == "BatchNormalization":
            group.params += [i for i in node.input[1:5] if i not in group.params]
            todo.append(node.input[0])
        elif node.op_type in _BINARY:
            for i in node.input:
                c = g.const(i)
                shape = g.shapes.get(i)
                if c is None and shape is not None and _broadcasts(shape, g.shapes.get(t), channels):
                    # A gate map (N, 1, H, W) or a row vector: its producer's filters are not these channels.
                    fail(f"{node.name} broadcasts {i} of shape {tuple(shape)} over the channels")
                elif c is None:
                    todo.append(i)
                elif c.size > 1 and i not in group.params:
                    if c.size != channels or c.ndim < 3 or c.shape[-3] != channels:
                        fail(f"{node.name} broadcasts a constant of shape {c.shape}")
                    group.params.append(i)
                    group.param_axes[i] = c.ndim - 3
        else:
            fail(f"{t} is made by {node.op_type} {node.name}")
        # Forwards: who reads it?
        for user in g.consumers.get(t, []):
            op = user.op_type
            if t in flat:
                if op == "Gemm" and user.input[0] == t and user.input[1] in g.inits:
                    axis = 1 if g.attr(user, "transB", 0) else 0
                    group.consumers.append((user, user.input[1], axis, flat[t]))
                elif op == "MatMul" and user.input[0] == t and user.input[1] in g.inits:
                    group.consumers.append((user, user.input[1], 0, flat[t]))
                else:
                    fail(f"flattened channels feed {op} {user.name}")
            elif op == "Conv" and user.input[0] == t:
                if _is_depthwise(g, user):
                    todo.append(user.output[0])
                elif g.attr(user, "group", 1) != 1:
                    fail(f"grouped conv {user.name}")
                elif user.input[1] not in g.inits:
                    fail(f"conv {user.name}'s weight is computed, not a stored tensor")
                else:
                    group.consumers.append((user, user.input[1], 1, 1))
            elif op in _CHANNELWISE or op == "BatchNormalization" or op in _BINARY:
                todo.append(user.output[0])
            elif op in ("ReduceMean", "ReduceMax") and user.input[0] == t:
                axes = _reduce_axes(g, user)
                if axes is None or 1 in axes or 0 in axes:
                    fail(f"{op} {user.name} reduces over channels")
                elif g.attr(user, "keepdims", 1):
                    todo.append(user.output[0])
                elif sorted(axes) == list(range(2, _rank(g, t))):
                    flat[user.output[0]] = 1  # (N, C): one feature per channel
                    todo.append(user.output[0])
                else:
                    fail(f"{op} {user.name} drops dims {axes}")
            elif op in ("Flatten", "Reshape"):
                shape = g.shapes.get(t)
                if shape is None or len(shape) != 4 or min(shape[1:]) <= 0:
                    fail(f"{op} {user.name} of a tensor of unknown shape")
                    continue
                hw = shape[2] * shape[3]
                if op == "Reshape":
                    target = g.const(user.input[1])
                    is_flatten = (
                        target is not None and target.size == 2 and (target[1] == -1 or target[0] in (0, -1))
                    )
                    if target is None or not is_flatten:
                        fail(f"Reshape {user.name} is not a flatten")
                        continue
                    if target[1] != -1:
                        group.reshapes.append((user.input[1], hw))
                elif g.attr(user, "axis", 1) != 1:
                    fail(f"Flatten {user.name} on axis != 1")
                    continue
                flat[user.output[0]] = hw
                todo.append(user.output[0])
            else:
                fail(f"{t} feeds {op} {user.name}")
    return group, seen


def channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """Every group of channels rooted at a (non-depthwise) Conv, prunable or with its ``problem``."""
    g = _Graph(model)
    groups: list[ChannelGroup] = []
    covered: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or _is_depthwise(g, node) or node.output[0] in covered:
            continue
        w = g.inits.get(node.input[1])
        if w is None:
            continue
        group, tensors = _grow(g, node.output[0], int(w.dims[0]))
        covered |= tensors
        groups.append(group)
    return groups
