"""Structured channel pruning on the ONNX graph, and unstructured pruning where kernels use it.

Pruning works on the (cleaned-up, BatchNorm-folded) ONNX graph, so ONNX-file inputs are prunable
too. Channels are grouped by dependency (``channel_groups``): a residual Add ties its operands'
channels together, a depthwise conv passes its input channels through, and the Linear/MatMul after a
Flatten owns ``H*W`` weight columns per channel. A group is pruned as a whole by removing whole
filters from its producers and the matching slices from every consumer; a group that reaches a
graph output or an op we cannot follow is left alone (and reported). Removed channels' average
contribution is folded into the consumers' biases on calibration data (``recalibrate``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import PruneRefusedError
from edgectl.compress.graph import cpu_session

# Ops that map channel c of their input to channel c of their output.
_CHANNELWISE = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Softplus", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Exp",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass(frozen=True)
class PruneConfig:
    """``ratio`` of channels to remove per group; kept counts round to ``round_to`` for fast kernels."""

    ratio: float = 0.5
    kind: Literal["structured", "unstructured"] = "structured"
    round_to: int = 8
    recalibrate: bool = True


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, and every weight slice that removing one implies."""

    channels: int
    producers: list[str] = field(default_factory=list)  # Conv weight inits: filters on axis 0
    biases: list[str] = field(default_factory=list)  # producer biases: axis 0
    params: list[str] = field(default_factory=list)  # per-channel params (BN, depthwise, scales): axis 0
    depthwise: list[onnx.NodeProto] = field(default_factory=list)  # their `group` attribute shrinks
    consumers: list[tuple[onnx.NodeProto, str, int, int]] = field(
        default_factory=list
    )  # node, weight, axis, hw
    reshapes: list[tuple[str, int]] = field(default_factory=list)  # (shape init, hw) after a Flatten
    problem: str | None = None


@dataclass(frozen=True)
class PruneReport:
    """What was pruned: groups, channels before and after, and why other groups were left alone."""

    groups: int
    pruned_groups: int
    channels_before: int
    channels_after: int
    skipped: tuple[str, ...]
    recalibrated_nodes: int

    def as_dict(self) -> dict[str, object]:
        """For the manifest."""
        return {**self.__dict__, "skipped": list(self.skipped)}


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


def _reduce_axes(g: _Graph, node: onnx.NodeProto) -> list[int] | None:
    # Opset 18 moved `axes` from an attribute to an input.
    if len(node.input) > 1 and node.input[1]:
        axes = g.const(node.input[1])
        return None if axes is None else [int(a) % 4 for a in axes.ravel()]
    attr = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    return None if attr is None else [int(a) % 4 for a in attr]


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
                if c is None:
                    todo.append(i)
                elif c.size > 1 and i not in group.params:
                    if c.size != channels or c.ndim < 3 or c.shape[-3] != channels:
                        fail(f"{node.name} broadcasts a constant of shape {c.shape}")
                    group.params.append(i)
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
                elif sorted(axes) == [2, 3]:
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


def _keep(group: ChannelGroup, arrays: dict[str, np.ndarray], cfg: PruneConfig) -> np.ndarray:
    """Indices of the channels to keep: the largest filters (L2, normalised per producer)."""
    score = np.zeros(group.channels)
    for name in group.producers:
        norms = np.linalg.norm(arrays[name].reshape(group.channels, -1), axis=1)
        score += norms / max(float(norms.mean()), 1e-12)
    target = group.channels * (1.0 - cfg.ratio)
    step = cfg.round_to if group.channels >= 2 * cfg.round_to else 1
    keep = int(max(step, round(target / step) * step))
    return np.sort(np.argsort(-score, kind="stable")[: min(keep, group.channels)])


def prune_structured(src: Path, dst: Path, cfg: PruneConfig, calib: SampleSet | None = None) -> PruneReport:
    """Remove ``cfg.ratio`` of the channels of every prunable group of ``src``; write ``dst``."""
    if not 0.0 <= cfg.ratio < 1.0:
        raise PruneRefusedError(f"prune ratio must be in [0, 1), got {cfg.ratio}")
    model = onnx.load(str(src))
    groups = channel_groups(model)
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        for i in n.input:
            uses[i] += 1
    skipped = [f"{len(g.producers)} conv(s) x {g.channels} ch: {g.problem}" for g in groups if g.problem]
    slices: list[tuple[str, int, np.ndarray]] = []
    bias_fix: list[tuple[onnx.NodeProto, str, int, np.ndarray]] = []
    regroup: list[tuple[onnx.NodeProto, int]] = []
    before = after = 0
    pruned = 0
    for group in groups:
        before += group.channels
        if group.problem is None and any(uses[w] > 1 for w in group.producers + group.params):
            group.problem = "a weight is shared with another node"
            skipped.append(f"{group.channels} ch: {group.problem}")
        keep = np.arange(group.channels) if group.problem else _keep(group, arrays, cfg)
        after += len(keep)
        if len(keep) == group.channels:
            continue
        pruned += 1
        for name in group.producers + group.biases + group.params:
            slices.append((name, 0, keep))
        regroup += [(node, len(keep)) for node in group.depthwise]
        drop = np.setdiff1d(np.arange(group.channels), keep)
        for node, weight, axis, hw in group.consumers:
            cols = (keep[:, None] * hw + np.arange(hw)[None, :]).ravel()
            slices.append((weight, axis, cols))
            bias_fix.append((node, weight, axis, (drop[:, None] * hw + np.arange(hw)[None, :]).ravel()))
        for shape_name, hw in group.reshapes:
            arrays[shape_name] = np.array([arrays[shape_name][0], len(keep) * hw], dtype=np.int64)
    fixed = _recalibrate(model, arrays, bias_fix, calib) if cfg.recalibrate and calib is not None else 0
    # Graph edits only after recalibration, which runs the unpruned model.
    for node, groups_now in regroup:
        for a in node.attribute:
            if a.name == "group":
                a.i = groups_now
    for name, axis, idx in slices:
        arrays[name] = np.take(arrays[name], idx, axis=axis)
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return PruneReport(len(groups), pruned, before, after, tuple(skipped), fixed)


def _recalibrate(
    model: onnx.ModelProto,
    arrays: dict[str, np.ndarray],
    fixes: list[tuple[onnx.NodeProto, str, int, np.ndarray]],
    calib: SampleSet,
) -> int:
    """Fold the mean contribution of removed input channels into each consumer's bias.

    A consumer loses ``sum_c W[:, c] * x_c`` over the removed channels ``c``; on calibration data its
    expectation is ``W[:, removed] @ mean(x_removed)``, which a bias can carry exactly (up to padding).
    """
    if not fixes:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = sorted({n.input[0] for n, *_ in fixes})
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in wanted if t not in known])
    session = cpu_session(probe.SerializeToString(), threads=0)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in calib.take(64).batches(16):
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        for t in wanted:
            x = np.asarray(outs[t], dtype=np.float64)
            # Per input feature (flat) or per channel (NCHW, averaged over space).
            per = (
                x.reshape(x.shape[0], -1)
                if x.ndim == 2
                else x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)
            )
            sums[t] = sums.get(t, 0) + per.sum(axis=0)
        count += next(iter(feed.values())).shape[0]
    for node, weight, axis, dropped in fixes:
        mean = sums[node.input[0]] / max(count, 1)
        w = arrays[weight]
        if node.op_type == "Conv":
            shift = np.tensordot(w[:, dropped].sum(axis=(2, 3)), mean[dropped], axes=([1], [0]))
        else:
            wd = np.take(w, dropped, axis=axis)
            shift = mean[dropped] @ (wd if axis == 0 else wd.T)
        bias_index = 2
        if node.op_type == "Gemm":
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
            shift = shift * alpha / (beta or 1.0)
        if node.op_type == "MatMul" or len(node.input) <= bias_index or not node.input[bias_index]:
            continue  # no bias to carry the shift; the fine-tune hook is the remedy there
        bias = node.input[bias_index]
        arrays[bias] = (arrays[bias] + shift.astype(arrays[bias].dtype)).astype(arrays[bias].dtype)
    return len(fixes)


def prune_unstructured(src: Path, dst: Path, cfg: PruneConfig, *, profile_name: str, sparse_2_4: bool) -> int:
    """Zero the 2 smallest of every 4 input weights (2:4) where the target runs sparse kernels.

    Zeros that no kernel skips make a model neither faster nor smaller, so without 2:4 support on
    the target this refuses instead of pretending.
    """
    if not sparse_2_4:
        raise PruneRefusedError(
            f"unstructured pruning would not speed up {profile_name}: its kernels are dense "
            "(ORT's CPU EP skips no zeros)",
            hint="use structured channel pruning (prune kind: structured), which removes whole channels",
        )
    model = onnx.load(str(src))
    weights = {
        n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
    }
    done = 0
    for init in model.graph.initializer:
        if init.name not in weights:
            continue
        w = numpy_helper.to_array(init)
        if w.ndim < 2 or w.shape[1] % 4:
            continue  # TensorRT's sparse tactics need input channels in multiples of 4
        moved = np.moveaxis(w, 1, -1)
        groups = moved.reshape(-1, 4)
        order = np.argsort(np.abs(groups), axis=1)
        mask = np.ones_like(groups, dtype=bool)
        np.put_along_axis(mask, order[:, :2], False, axis=1)
        pruned = np.moveaxis((groups * mask).reshape(moved.shape), -1, 1)
        init.CopyFrom(numpy_helper.from_array(pruned.astype(w.dtype), init.name))
        done += 1
    onnx.save(model, str(dst))
    return done
