"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before int8 quantization.

Transformer activations carry a few outlier channels that wreck per-tensor activation scales. For
each activation feeding MatMuls with constant weights, per input channel ``j`` we pick
``s_j = max|X_j|^a / max|W_j|^(1-a)``, insert ``X / s`` once (one cheap Mul shared by those MatMuls)
and scale weight row ``j`` by ``s_j``: the product is unchanged, both factors quantize better.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgectl.compress.data import SampleSet
from edgectl.compress.graph import probe_session


def smooth(
    src: Path,
    dst: Path,
    data: SampleSet,
    *,
    alpha: float = 0.5,
    samples: int = 32,
    maxima: Path | None = None,
) -> int:
    """Write the smoothed ``src`` to ``dst``; returns how many activations were smoothed.

    ``maxima``: an .npz file of the activations' maxima on ``data``, read when it exists (they do not
    depend on ``alpha``) and written after they were measured.
    """
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
    amax = _activation_maxima(model, acts, data, samples, maxima)
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


def smoothed(src: Path, dst: Path, data: SampleSet, alpha: float, cache: Path | None) -> Path:
    """``src`` after SmoothQuant at ``alpha``: with a ``cache`` folder, written once per source, samples
    and alpha, and its activation maxima once per source and samples (the format candidates of a
    search share the file, and so their calibration; another alpha reruns no model)."""
    if cache is None:
        out = dst.with_name(dst.stem + ".smoothed.onnx")
        smooth(src, out, data, alpha=alpha)
        return out
    cache.mkdir(parents=True, exist_ok=True)
    stat = src.stat()
    key = repr((str(src.resolve()), stat.st_mtime_ns, stat.st_size, data.source, data.count))
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    out = cache / f"{digest}.smooth{alpha:g}.onnx"
    if not out.exists():
        part = out.with_name(out.name + ".part")  # a crash leaves no half-written model to reuse
        smooth(src, part, data, alpha=alpha, maxima=cache / f"{digest}.amax.npz")
        part.replace(out)
    return out


def _activation_maxima(
    model: onnx.ModelProto, acts: Iterable[str], data: SampleSet, samples: int, maxima: Path | None
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each activation in ``acts`` over the first ``samples`` of ``data``."""
    wanted = set(acts)
    if maxima is not None and maxima.exists():
        with np.load(maxima, allow_pickle=False) as npz:  # tensor names are not safe npz keys
            stored = {str(n): npz[f"a{i}"] for i, n in enumerate(npz["names"])}
        if wanted <= set(stored):
            return {name: stored[name] for name in wanted}
    session, names = probe_session(model, wanted)
    amax: dict[str, np.ndarray] = {}
    for feed in data.take(samples).batches(8):
        for name, value in zip(names, session.run(None, feed), strict=True):
            if name in wanted:
                v = np.abs(np.asarray(value)).reshape(-1, np.asarray(value).shape[-1]).max(axis=0)
                amax[name] = np.maximum(amax.get(name, v), v)
    if maxima is not None:
        arrays = {f"a{i}": v for i, v in enumerate(amax.values())}
        with maxima.with_name(maxima.name + ".part").open("wb") as f:
            np.savez(f, names=np.array(list(amax)), **arrays)  # type: ignore[arg-type]
        maxima.with_name(maxima.name + ".part").replace(maxima)
    return amax


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
