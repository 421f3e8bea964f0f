"""Residual Add + LayerNormalization stays two standard ops: ORT's SkipLayerNormalization is slower on CPU.

Real ORT sessions: what ORT itself runs is read off the graph it optimizes at load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgectl.compress.evaluate import Latency
from edgectl.compress.passes.cleanup import CleanupConfig, cleanup
from edgectl.compress.passes.residual import keep_residual_unfused, residual_as_add
from edgectl.compress.pipeline import CompressRequest, run
from edgectl.compress.recipe import Recipe
from tests.compress.conftest import masked_attention, token_samples

DIM = 32


def _ops_ort_runs(path: Path, tmp: Path) -> list[str]:
    """The op types of the graph ORT runs after its own load-time fusions (all levels, CPU EP)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp / f"{path.stem}.ort-optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def encoder_block(path: Path) -> Path:
    """``masked_attention`` (its last node the residual Add) followed by LayerNormalization, a bias'd
    feed-forward and a second residual Add + LayerNormalization: a BERT layer's two norms."""
    model = onnx.load(str(masked_attention(path)))
    rng = np.random.default_rng(3)
    g = model.graph
    g.initializer.extend([
        numpy_helper.from_array(rng.uniform(0.5, 1.5, DIM).astype(np.float32), "ln_g"),
        numpy_helper.from_array(rng.normal(0, 0.1, DIM).astype(np.float32), "ln_b"),
        numpy_helper.from_array((rng.standard_normal((DIM, DIM)) * 0.2).astype(np.float32), "w_ff"),
        numpy_helper.from_array(rng.normal(0, 0.1, DIM).astype(np.float32), "b_ff"),
    ])  # fmt: skip
    g.output[0].name = "out"
    g.node.extend([
        helper.make_node("LayerNormalization", ["y", "ln_g", "ln_b"], ["n1"], name="ln1", axis=-1, epsilon=1e-12),
        helper.make_node("MatMul", ["n1", "w_ff"], ["f0"], name="ff"),
        helper.make_node("Add", ["f0", "b_ff"], ["f1"], name="ff_bias"),
        helper.make_node("Add", ["f1", "n1"], ["r2"], name="residual2"),
        helper.make_node("LayerNormalization", ["r2", "ln_g", "ln_b"], ["out"], name="ln2", axis=-1, epsilon=1e-12),
    ])  # fmt: skip
    # Full shapes, as a dynamo export carries them: what lets ORT fuse at load.
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    return path


def test_shapes_alone_make_ort_fuse_its_slower_op(tmp_path: Path) -> None:
    """The premise: with the residual's shapes known ORT fuses SkipLayerNormalization at load."""
    ops = _ops_ort_runs(encoder_block(tmp_path / "block.onnx"), tmp_path)
    assert "SkipLayerNormalization" in ops


def test_residual_add_becomes_sum_and_ort_fuses_nothing(tmp_path: Path) -> None:
    src = encoder_block(tmp_path / "block.onnx")
    model = onnx.load(str(src))
    assert keep_residual_unfused(model) == 2  # the two residual adds; the bias add stays an Add
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sum") == 2 and "ff_bias" in {n.name for n in model.graph.node if n.op_type == "Add"}
    dst = tmp_path / "sum.onnx"
    onnx.save(model, str(dst))
    assert "SkipLayerNormalization" not in _ops_ort_runs(dst, tmp_path)
    feed = token_samples(4, seed=0)
    np.testing.assert_allclose(_run(dst, feed), _run(src, feed), rtol=0, atol=1e-5)
    # Given back (the variant clean-up times against it): ORT fuses at load again.
    assert residual_as_add(model) == 2
    onnx.save(model, str(dst))
    assert "SkipLayerNormalization" in _ops_ort_runs(dst, tmp_path)


def test_skip_layer_norm_in_the_input_is_split_back(tmp_path: Path) -> None:
    """A graph that already holds SkipLayerNormalization (with bias, sum output read) gets the plain ops."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(1, 0.1, DIM).astype(np.float32), n) for n in ("g", "b", "bias")
    ]
    node = helper.make_node(
        "SkipLayerNormalization", ["x", "r", "g", "b", "bias"], ["y", "", "", "s"],
        name="sln", domain="com.microsoft", epsilon=1e-5,
    )  # fmt: skip
    shape = ["n", "t", DIM]
    graph = helper.make_graph(
        [node, helper.make_node("Mul", ["y", "s"], ["out"], name="use_both")], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "r")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    src = tmp_path / "sln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(src))
    model = onnx.load(str(src))
    assert keep_residual_unfused(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Add", "Sum", "LayerNormalization", "Mul"]
    dst = tmp_path / "split.onnx"
    onnx.save(model, str(dst))
    assert "SkipLayerNormalization" not in _ops_ort_runs(dst, tmp_path)
    feed = {k: rng.standard_normal((2, 5, DIM)).astype(np.float32) for k in ("x", "r")}
    np.testing.assert_allclose(_run(dst, feed), _run(src, feed), rtol=1e-5, atol=1e-5)


def test_cleanup_leaves_ort_no_skip_layer_norm_to_run(tmp_path: Path) -> None:
    """Clean-up's fusions and inferred shapes used to hand ORT a graph it runs with SkipLayerNormalization
    (4-6x slower on CPU than Add + LayerNormalization): a TorchScript BERT export lost 8 % float, 14 % int8."""
    src = encoder_block(tmp_path / "block.onnx")
    for label, cfg in [
        ("full", CleanupConfig()),
        ("shapes", CleanupConfig(optimize=False, fuse_transformer=False)),
    ]:
        dst = tmp_path / f"{label}.onnx"
        report = cleanup(src, dst, cfg)
        assert report.residual_sums == 2 and "SkipLayerNormalization" not in report.fused
        assert "SkipLayerNormalization" not in _ops_ort_runs(dst, tmp_path), label
        feed = token_samples(4, seed=1)
        np.testing.assert_allclose(_run(dst, feed), _run(src, feed), rtol=0, atol=1e-4)
    # Off (another EP, where the contrib op may be the fast one): the old graph, fused.
    dst = tmp_path / "off.onnx"
    assert cleanup(src, dst, CleanupConfig(residual_unfused=False)).residual_sums == 0
    assert "SkipLayerNormalization" in _ops_ort_runs(dst, tmp_path)


@pytest.mark.parametrize("skip_norm_faster", [False, True])
def test_the_clean_up_times_skip_layer_norm_and_keeps_it_only_where_faster(
    tmp_path: Path, skip_norm_faster: bool
) -> None:
    """The rewrite is measured on the target like every clean-up: the graph ORT fuses at load is a variant."""
    timed: list[str] = []

    def timer(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        timed.extend(p.name for p in models)
        # The input is the slowest (so a clean-up ships); SkipLayerNormalization is faster or slower.
        fast = [
            p.name.startswith("clean") and p.name.startswith("clean-skipnorm") == skip_norm_faster
            for p in models
        ]
        return [Latency(1.0 if f else 2.0, 1.0 if f else 2.0, 1) for f in fast]

    src = encoder_block(tmp_path / "block.onnx")
    np.savez(tmp_path / "eval.npz", **token_samples(16, seed=2))  # type: ignore[arg-type]
    out = tmp_path / "out"
    run(CompressRequest(model=str(src), out_dir=out, recipe=Recipe.from_options(quantize="none"),
                        eval=tmp_path / "eval.npz", timer=timer))  # fmt: skip
    record = json.loads((out / "manifest.json").read_text())["recipe"]["cleanup"]
    assert "with SkipLayerNormalization_ms" in record["timing"]
    assert any(n.startswith("clean-skipnorm") for n in timed)
    ops = _ops_ort_runs(out / "model.onnx", tmp_path)
    if skip_norm_faster:
        assert record["kept"] == "with SkipLayerNormalization" and "SkipLayerNormalization" in ops
    else:
        assert record["kept"] != "with SkipLayerNormalization" and "SkipLayerNormalization" not in ops
