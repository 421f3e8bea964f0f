"""Linear layers exported as Gemm reach the dynamic and weight-only quantizers (as MatMul), static keeps Gemm.

Real torch exports and hand-built Gemm variants, real ORT sessions. Speed is never asserted: where
the choice depends on it, a deterministic timer stands in for the clock.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgectl.compress.evaluate import Latency
from edgectl.compress.passes.gemm import gemms_as_matmul, rewrite_changes
from edgectl.compress.pipeline import CompressRequest, CompressResult, run
from edgectl.compress.quantizer import QuantConfig, quantize
from edgectl.compress.recipe import Recipe
from tests.compress.conftest import cost_model

torch = pytest.importorskip("torch")
nn = torch.nn
INT8_DYNAMIC_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


class ScaledLinear(nn.Module):
    """``beta * b + alpha * x @ W.T`` with torch.addmm: exports as a Gemm with alpha and beta not 1."""

    def __init__(self, k: int, n: int, *, alpha: float, beta: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) / k**0.5)
        self.bias = nn.Parameter(torch.randn(n) * 0.1)
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.t(), beta=self.beta, alpha=self.alpha)


def _mlp(*, scaled: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if scaled:  # one scaled Gemm, and a plain one ORT's dynamic quantizer rewrites itself
        return nn.Sequential(ScaledLinear(64, 128, alpha=0.5, beta=2.0), nn.ReLU(), nn.Linear(128, 10)).eval()
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()


def _export(module: nn.Module, path: Path, *, batch: int | None = None) -> Path:
    """torch.onnx.export of a 2-D-input model: a dynamic batch axis, or a fixed ``batch``."""
    example = torch.from_numpy(_samples(batch or 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"], opset_version=17,
            dynamic_axes=None if batch else {"x": {0: "batch"}, "y": {0: "batch"}},
        )  # fmt: skip
    return path


def _samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def _npz(path: Path, x: np.ndarray) -> Path:
    np.savez(path, x=x)
    return path


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return np.asarray(
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    )


def _gemm_model(
    *, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, c: str = "const", shared: bool = False
) -> onnx.ModelProto:
    """x[n, 16] -> Gemm(s) -> y[n, 8]; ``c``: "const" (a [8] bias), "row" (a [1, 8] bias), "input" (a graph input), "none"."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 16) if trans_b else (16, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])]
    gemm_in = ["x", "w"]
    if c in ("const", "row"):
        bias = rng.standard_normal((8,) if c == "const" else (1, 8)).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, "c"))
        gemm_in.append("c")
    elif c == "input":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [8]))
        gemm_in.append("c")
    attrs = {"transB": trans_b, "alpha": alpha, "beta": beta}
    nodes = [helper.make_node("Gemm", gemm_in, ["y"], name="fc", **attrs)]
    if shared:  # a second layer reading the same weight: its folded copy is made once, the source kept
        nodes[0].output[0] = "h"
        nodes.append(helper.make_node("Gemm", ["x", "w", *gemm_in[2:]], ["h2"], name="fc2", **attrs))
        nodes.append(helper.make_node("Add", ["h", "h2"], ["y"], name="sum"))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


VARIANTS = {
    "transB=1": {"trans_b": 1},
    "transB=0": {"trans_b": 0},
    "alpha,beta": {"alpha": 0.37, "beta": 1.9},
    "transB=0 alpha,beta": {"trans_b": 0, "alpha": 2.5, "beta": -0.5},
    "no C": {"c": "none"},
    "no C alpha": {"c": "none", "alpha": 0.3},
    "C [1, N]": {"c": "row", "beta": 0.5},
    "C a graph input": {"c": "input"},
    "shared weight": {"shared": True, "alpha": 0.5},
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_a_gemm_rewritten_as_matmul_gives_the_same_outputs(variant: str) -> None:
    model = _gemm_model(**VARIANTS[variant])  # type: ignore[arg-type]
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    feed = {"x": x, "c": np.arange(8, dtype=np.float32)} if variant == "C a graph input" else {"x": x}
    before = _session_run(model, feed)
    assert gemms_as_matmul(model) == (2 if VARIANTS[variant].get("shared") else 1)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert "Gemm" not in ops and ops["MatMul"] >= 1
    assert any(n.name == "fc" and n.op_type == "MatMul" for n in model.graph.node)  # exclusions still apply
    after = _session_run(model, feed)
    if all(VARIANTS[variant].get(k, 1.0) == 1.0 for k in ("alpha", "beta")):
        assert np.array_equal(before, after)  # nothing folded: the same float products
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def _session_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


@pytest.mark.parametrize("batch", [None, 1], ids=["dynamic batch", "fixed batch"])
def test_torch_linear_layers_are_rewritten_bit_for_bit(tmp_path: Path, batch: int | None) -> None:
    path = _export(_mlp(), tmp_path / "mlp.onnx", batch=batch)
    model = onnx.load(str(path))
    assert Counter(n.op_type for n in model.graph.node)["Gemm"] == 3  # what torch writes for nn.Linear
    x = _samples(batch or 7, seed=3)
    before = _run(model, x)
    assert gemms_as_matmul(model) == 3
    assert np.array_equal(_run(model, x), before)


def test_gemms_that_are_not_linear_layers_stay() -> None:
    transposed_a = _gemm_model()
    transposed_a.graph.node[0].attribute.append(helper.make_attribute("transA", 1))
    weight_input = _gemm_model()
    weight_input.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 16]))
    del weight_input.graph.initializer[0]  # B is computed at run time, not a weight
    scaled_input_c = _gemm_model(c="input", beta=0.5)  # beta on a run-time C: no constant to fold it into
    for model in (transposed_a, weight_input, scaled_input_c):
        assert gemms_as_matmul(model) == 0
        assert [n.op_type for n in model.graph.node] == ["Gemm"]


class OpsSeen:
    """``cost_model`` as the clock, recording the ops of every model timed (candidate files are gone after the run)."""

    def __init__(self, fast_gemm: bool = False) -> None:
        self.ops: dict[str, Counter[str]] = {}
        self.fast_gemm = fast_gemm

    def __call__(self, models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        out = cost_model(models, feed)
        for i, path in enumerate(models):
            ops = self.ops.setdefault(path.name, _ops(path))
            if self.fast_gemm and "Gemm" in ops and out[i].p50_ms < 1:
                out[i] = Latency(0.3, 0.3, 1)  # a clock on which quantized models that kept a Gemm win
        return out


def _compress(
    tmp_path: Path, model: Path, mode: str, timer: OpsSeen, *, calib: bool = True
) -> CompressResult:
    return run(
        CompressRequest(model=str(model), out_dir=tmp_path / "out", recipe=Recipe.from_options(quantize=mode),
                        calib=_npz(tmp_path / "c.npz", _samples(64, 1)) if calib else None,
                        eval=_npz(tmp_path / "e.npz", _samples(64, 2)), max_drop=0.02, timer=timer)
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["int8-weight", "int4-weight"])
def test_weight_only_quantizes_a_gemm_mlp(tmp_path: Path, mode: str) -> None:
    model = _export(_mlp(), tmp_path / "mlp.onnx")
    result = _compress(tmp_path, model, mode, OpsSeen())
    assert result.chosen.passed and result.chosen.config and result.chosen.config["mode"] == mode
    ops = _ops(tmp_path / "out" / "model.onnx")
    assert ops["MatMulNBits"] == 3 and "Gemm" not in ops, ops  # every linear layer, the head included


def test_dynamic_int8_quantizes_gemms_with_alpha_and_beta(tmp_path: Path) -> None:
    model = _export(_mlp(scaled=True), tmp_path / "scaled.onnx")
    gemms = [n for n in onnx.load(str(model)).graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and {a.name for a in gemms[0].attribute} >= {"alpha", "beta"}
    # ORT's dynamic quantizer turns a Gemm into a MatMul only with alpha = beta = 1: the first stayed float.
    assert rewrite_changes(model, "int8-dynamic")
    seen = OpsSeen()
    result = _compress(tmp_path, model, "int8-dynamic", seen, calib=False)
    ops = _ops(tmp_path / "out" / "model.onnx")
    assert ops["MatMulInteger"] == 2 and ops.keys() & INT8_DYNAMIC_OPS and "Gemm" not in ops, ops
    assert result.chosen.passed and result.chosen.config and result.chosen.config["gemm_as_matmul"]
    # The lead format also built with the Gemms as they are, and timed: ORT leaves the scaled one float.
    kept = [t for t in result.trials if t.name.endswith("gemm kept")]
    assert len(kept) == 1 and kept[0].latency is not None
    assert any(o["Gemm"] == 1 and o["MatMulInteger"] == 1 for o in seen.ops.values())


def test_the_rewrite_is_not_kept_where_the_gemms_as_they_are_run_faster(tmp_path: Path) -> None:
    model = _export(_mlp(scaled=True), tmp_path / "scaled.onnx")
    result = _compress(tmp_path, model, "int8-dynamic", OpsSeen(fast_gemm=True), calib=False)
    assert result.chosen.config and result.chosen.config["gemm_as_matmul"] is False
    assert _ops(tmp_path / "out" / "model.onnx")["Gemm"] == 1


def test_auto_tries_weight_only_on_a_gemm_model_and_static_keeps_its_gemms(tmp_path: Path) -> None:
    model = _export(_mlp(), tmp_path / "mlp.onnx")
    seen = OpsSeen()
    result = _compress(tmp_path, model, "auto", seen)
    modes = {str(t.config["mode"]) for t in result.trials if t.config}
    assert modes == {"int8-dynamic", "int8-static", "int8-weight", "int4-weight"}
    timed = list(seen.ops.values())
    assert any(o["MatMulNBits"] == 3 for o in timed)  # the weight-only candidates quantize every layer
    # Static int8 reads Gemm itself (QGemm, or QDQ around Gemm): it never sees the rewrite.
    assert any(o["QGemm"] == 3 for o in timed) or any(o["Gemm"] == 3 and o["QuantizeLinear"] for o in timed)
    assert not any(o["MatMul"] for o in timed)
    # alpha = beta = 1: ORT's dynamic quantizer would rewrite these Gemms the same way, so no twin.
    assert not any(t.name.endswith("gemm kept") for t in result.trials)


def test_quantize_leaves_the_static_int8_gemm_path_alone(tmp_path: Path) -> None:
    from edgectl.compress.data import SampleSet

    model = _export(_mlp(), tmp_path / "mlp.onnx")
    calib = SampleSet({"x": _samples(32, 1)}, None, "calib")
    out = tmp_path / "static.onnx"
    quantize(model, out, QuantConfig("int8-static", "QOperator"), calib)
    assert _ops(out)["QGemm"] == 3
    assert not (
        tmp_path / "mlp.linear.onnx"
    ).exists()  # the rewrite is written only for the modes that read it


def test_an_excluded_gemm_stays_float_after_the_rewrite(tmp_path: Path) -> None:
    # Mixed precision and the float-by-rule list name nodes of the float graph: the Gemm's name.
    model = _export(_mlp(), tmp_path / "mlp.onnx")
    first = next(n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Gemm")
    for mode in ("int8-dynamic", "int8-weight"):
        out = tmp_path / f"{mode}.onnx"
        quantize(model, out, QuantConfig(mode, "QOperator", exclude=(first,)))
        kept = [n for n in onnx.load(str(out)).graph.node if n.name == first]
        assert [n.op_type for n in kept] == ["MatMul"], mode
        assert _ops(out)["MatMulInteger" if mode == "int8-dynamic" else "MatMulNBits"] == 2


def test_a_twin_with_the_gemms_kept_is_built_only_where_it_is_another_model(tmp_path: Path) -> None:
    plain = _export(_mlp(), tmp_path / "mlp.onnx")
    scaled = _export(_mlp(scaled=True), tmp_path / "scaled.onnx")
    mixed = _gemm_model()  # a Gemm head after a MatMul layer: weight-only with the Gemm kept is a third model
    mixed.graph.initializer.append(numpy_helper.from_array(np.eye(16, dtype=np.float32), "w0"))
    mixed.graph.node.insert(0, helper.make_node("MatMul", ["x", "w0"], ["x0"], name="mm"))
    mixed.graph.node[1].input[0] = "x0"
    onnx.save(mixed, str(tmp_path / "mixed.onnx"))
    assert not any(rewrite_changes(plain, m) for m in ("int8-dynamic", "int8-weight", "int8-static", "fp16"))
    assert rewrite_changes(scaled, "int8-dynamic") and not rewrite_changes(scaled, "int4-weight")
    assert rewrite_changes(tmp_path / "mixed.onnx", "int4-weight")
