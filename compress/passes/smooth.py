"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before int8 quantization.

Transformer activations carry a few outlier channels that wreck per-tensor activation scales. For
each activation feeding MatMuls with constant weights, per input channel ``j`` we pick
``s_j = max|X_j|^a / max|W_j|^(1-a)``, insert ``X / s`` once (one cheap Mul shared by those MatMuls)
and scale weight row ``j`` by ``s_j``: the product is unchanged, both factors quantize better.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgectl.compress.data import SampleSet
from edgectl.compress.graph import probe_session


def smooth(src: Path, dst: Path, data: SampleSet, *, alpha: float = 0.5, samples: int = 32) -> int:
    """Write the smoothed ``src`` to ``dst``; returns how many activations were smoothed."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[0] not in inits:
            users[node.input[0]].append(node)
    # Only 2-D weights whose rows are the activation's last axis.
    acts = {x: ns for x, ns in users.items() if all(len(inits[n.input[1]].dims) == 2 for n in ns)}
    if not acts:
        onnx.save(model, str(dst))
        return 0
    session, names = probe_session(model, acts)
    amax: dict[str, np.ndarray] = {}
    for feed in data.take(samples).batches(8):
        for name, value in zip(names, session.run(None, feed), strict=True):
            if name in acts:
                v = np.abs(np.asarray(value)).reshape(-1, np.asarray(value).shape[-1]).max(axis=0)
                amax[name] = np.maximum(amax.get(name, v), v)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    done = 0
    for x, nodes in acts.items():
        wmax = np.max([np.abs(weights[n.input[1]]).max(axis=1) for n in nodes], axis=0)
        s = np.power(np.maximum(amax[x], 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        inv = f"{x}_smooth_inv"
        out = f"{x}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        model.graph.node.append(helper.make_node("Mul", [x, inv], [out], name=f"{x}_smooth"))
        for n in nodes:
            n.input[0] = out
            weights[n.input[1]] = (weights[n.input[1]] * s[:, None]).astype(np.float32)
        done += 1
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    _toposort(model)
    onnx.save(model, str(dst))
    return done


def _toposort(model: onnx.ModelProto) -> None:
    """Re-order nodes so the inserted Muls come before their users (ONNX requires it)."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            ordered += rest  # a cycle or an outer-scope name: keep the remaining order
            break
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
