"""The quantization search on a tiny MLP with an outlier channel: real quantizer, real ORT sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import Evaluator
from edgectl.compress.recipe import QuantizeStep
from edgectl.compress.search import QuantSearch
from edgectl.devices import load_profile


def _mlp(path: Path) -> SampleSet:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.2, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.2, "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [w1, w2],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 3] *= 60.0  # one outlier channel, as transformer activations have
    return SampleSet({"x": x}, None, "t")


def test_smoothing_that_passes_is_retried_on_every_format_candidate(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    data = _mlp(src)
    ev = Evaluator(src, data)
    profile = load_profile("x86-cpu-avx2")
    step = QuantizeStep(mode="int8-dynamic")
    # A budget the plain candidates miss and SmoothQuant meets, read off a first unbounded run.
    probe = QuantSearch(ev, None, tmp_path / "probe", 1.0, lambda _m: None)
    (tmp_path / "probe").mkdir()
    plain = probe.run(src, step, "int8-dynamic", profile, None, vnni=False).trials
    best_plain = min(t.drop or 0.0 for t in plain if t.stage == "format")
    search = QuantSearch(ev, None, tmp_path, 0.8 * best_plain, lambda _m: None)
    found = search.run(src, step, "int8-dynamic", profile, None, vnni=False)
    smoothed = [t for t in found.trials if t.config and t.config["smooth_alpha"]]
    assert any(t.stage == "calibration" and t.passed for t in smoothed)
    retried = [t for t in smoothed if t.stage == "format"]
    # The other format/type candidates were rebuilt with the smoothing (and per-channel weights,
    # which smoothing needs) and scored, so the pipeline times them; no configuration twice.
    assert retried and all(t.quality is not None and t.config for t in retried)
    configs = [t.config for t in smoothed if t.config]
    assert all(c["per_channel"] for c in configs)
    assert {c["weights"] for c in configs} == {"s8", "u8"}
    assert {c["reduce_range"] for c in configs} == {True, False}
    labels = [t.name for t in found.trials]
    assert len(labels) == len(set(labels))
