"""The first-slice cut of the quantize search: one lost sample of eight is no evidence against a budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import Evaluator, QualityGate
from edgectl.compress.passes.quant_modes import QuantizeConfig
from edgectl.compress.passes.quantize import QuantSearch
from edgectl.devices import load_profile


def _identity_classifier(path: Path) -> Path:
    """logits = x @ I (2 classes): int8 weights of I are exact, so only the activations' rounding moves."""
    eye = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], "eye",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], [eye],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_one_flipped_sample_in_the_first_slice_does_not_end_a_top1_candidate(tmp_path: Path) -> None:
    model = _identity_classifier(tmp_path / "eye.onnx")
    # 200 samples; the first is a near tie (0.31 vs 0.3101) that int8's rounding makes an exact tie (argmax
    # flips to class 0); every other one is clear. One lost sample of 200: a drop of 0.005.
    x = np.tile(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), (100, 1))
    x[0] = [0.31, 0.3101]
    labels = x.argmax(axis=1).astype(np.int64)
    evaluator = Evaluator(model, SampleSet({"x": x}, labels, "eval"))
    search = QuantSearch(evaluator, None, tmp_path, 0.01, lambda _msg: None)
    found = search.run(
        model,
        QuantizeConfig("int8-dynamic", search=False),
        "int8-dynamic",
        load_profile("x86-cpu-vnni"),
        vnni=True,
    )
    trial = found.trials[0]  # the profile's hint; the ORT-default row was skipped as the hint's twin or built
    # It was cut as "hopeless: drop 0.1250 on the first 8 samples" and never scored on the rest.
    assert "hopeless" not in trial.note, [t.note for t in found.trials]
    assert trial.drop is not None and abs(trial.drop - 0.005) < 1e-9 and trial.passed


def test_a_top1_slice_is_hopeless_only_when_its_lost_samples_are_unlikely_at_the_budget() -> None:
    gate = QualityGate(0.01)
    assert not gate.hopeless(1 / 8, samples=8) and gate.hopeless(2 / 8, samples=8)
    assert not QualityGate(0.05).hopeless(2 / 8, samples=8) and QualityGate(0.05).hopeless(3 / 8, samples=8)
    assert QualityGate(0.0).hopeless(1 / 8, samples=8)  # no budget: any lost sample is decisive
