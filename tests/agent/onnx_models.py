"""Tiny real ONNX models built with onnx.helper, and signed artifacts around them, for agent tests.

An MLP with a batch dimension: ``x[batch, d0] -> MatMul/Add/Relu ... -> y[batch, dn]``. Every
layer's weights come from its own seed, so "only the last layer changed" is one argument.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgectl.artifact import Artifact, DriftSummary, SigningKey, TensorSpec, build_artifact


def mlp_model(
    path: Path,
    dims: Sequence[int] = (4, 8, 3),
    seeds: Sequence[int] | None = None,
    *,
    batch: bool = True,
    negate: bool = False,
    rows: int = 1,
) -> Path:
    """Write an MLP ``dims[0] -> ... -> dims[-1]`` (Relu between layers) to ``path``; ``negate``
    flips the sign of its outputs (a classifier whose top-1 is almost always wrong); without
    ``batch`` the first dimension is fixed at ``rows``."""
    seeds = list(seeds) if seeds is not None else list(range(len(dims) - 1))
    nodes, inits = [], []
    prev = "x"
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        rng = np.random.default_rng(seeds[i])
        w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        b = rng.standard_normal(d_out).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(dims) - 2
        mm, out = f"mm{i}", "y" if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [mm]))
        if last and negate:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], ["pos"]))
            nodes.append(helper.make_node("Neg", ["pos"], [out]))
        elif last:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out]))
        else:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    first: Any = "batch" if batch else rows
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [first, dims[-1]])],
        inits,
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    """Write ``graph`` as a checked opset-17 model (IR 8, what the agent's onnxruntime loads) to ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def string_model(path: Path) -> Path:
    """Write an Identity on a string tensor ``s[batch] -> t[batch]`` (a model with a BYTES input)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"])],
    )
    return _save(graph, path)


def int_model(path: Path) -> Path:
    """Write ``ids[batch, 2] (int64) -> out = ids + 1`` (a model with an integer input)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "one"], ["out"])],
        "ints",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", 2])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    return _save(graph, path)


def add_model(path: Path) -> Path:
    """Write ``a[batch, 3] + b[batch, 3] -> sum[batch, 3]`` (two batched inputs)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3])],
    )
    return _save(graph, path)


def tile_model(path: Path, times: int = 256) -> Path:
    """Write ``x[batch, 4] -> y[batch, 4 * times]`` (x repeated): a response ``times`` the request."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "reps"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4 * times])],
        [numpy_helper.from_array(np.array([1, times], np.int64), "reps")],
    )
    return _save(graph, path)


def run_direct(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    """The reference: a plain onnxruntime CPU session on the same file."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def mlp_artifact(
    out_dir: Path,
    work: Path,
    key: SigningKey,
    *,
    name: str = "mlp",
    version: int = 1,
    dims: Sequence[int] = (4, 8, 3),
    seeds: Sequence[int] | None = None,
    golden_outputs: dict[str, np.ndarray] | None = None,
    precision: str = "fp32",
    target_profile: str = "x86-cpu-avx2",
    parent_version: int | None = None,
    input_summary: DriftSummary | None = None,
    negate: bool = False,
) -> Artifact:
    """Build and sign an artifact around an MLP; ``golden_outputs`` overrides the true outputs (bad model)."""
    model = mlp_model(work / f"{name}-v{version}-{out_dir.name}.onnx", dims, seeds, negate=negate)
    x = np.random.default_rng(100).standard_normal((2, dims[0])).astype(np.float32)
    outputs = golden_outputs if golden_outputs is not None else run_direct(model, {"x": x})
    return build_artifact(
        out_dir,
        name=name,
        version=version,
        files={"model.onnx": model},
        input_signature=[TensorSpec("x", "float32", ("batch", dims[0]))],
        output_signature=[TensorSpec("y", "float32", ("batch", dims[-1]))],
        golden_inputs={"x": x},
        golden_outputs=outputs,
        recipe={"passes": []},
        target_profile=target_profile,
        metrics={},
        precision_map={"/fc": precision},
        source_model_sha256="ab" * 32,
        parent_version=parent_version,
        signing_key=key,
        created="2024-05-01T12:00:00Z",
        host="test",
        input_summary=input_summary,
    )
