"""The quantization search on a tiny MLP with an outlier channel: real quantizer, real ORT sessions."""

from __future__ import annotations

from pathlib import Path

from edgectl.compress.evaluate import Evaluator
from edgectl.compress.passes.quant_modes import QuantizeConfig
from edgectl.compress.passes.quantize import QuantSearch
from edgectl.devices import load_profile
from tests.compress.conftest import outlier_mlp


def test_smoothing_that_passes_is_retried_on_every_format_candidate(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    data = outlier_mlp(src)
    ev = Evaluator(src, data)
    profile = load_profile("x86-cpu-avx2")
    step = QuantizeConfig(mode="int8-dynamic")
    # A budget the plain candidates miss and SmoothQuant meets, read off a first unbounded run.
    probe = QuantSearch(ev, None, tmp_path / "probe", 1.0, lambda _m: None)
    (tmp_path / "probe").mkdir()
    plain = probe.run(src, step, "int8-dynamic", profile, vnni=False).trials
    best_plain = min(t.drop or 0.0 for t in plain if t.stage == "format")
    search = QuantSearch(ev, None, tmp_path, 0.8 * best_plain, lambda _m: None)
    found = search.run(src, step, "int8-dynamic", profile, vnni=False)
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


def test_a_passing_weight_only_model_does_not_stop_the_int8_search(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    data = outlier_mlp(src)
    ev = Evaluator(src, data)
    profile = load_profile("x86-cpu-avx2")
    step = QuantizeConfig(mode="auto")
    (tmp_path / "probe").mkdir()
    probe = QuantSearch(ev, None, tmp_path / "probe", 1.0, lambda _m: None)
    plain = probe.run(src, step, ["int8-dynamic"], profile, vnni=False).trials
    budget = 0.8 * min(t.drop or 0.0 for t in plain if t.stage == "format")
    found = QuantSearch(ev, None, tmp_path, budget, lambda _m: None).run(
        src, step, ["int8-dynamic", "int8-weight"], profile, vnni=False
    )
    weight = [t for t in found.trials if t.config and t.config["mode"] == "int8-weight"]
    assert weight and weight[0].passed  # activations stay float: the outlier channel costs nothing
    # The plain int8 candidates missed; the search still tried smoothing on them, and it passed.
    smoothed = [
        t
        for t in found.trials
        if t.config and t.config["mode"] == "int8-dynamic" and t.config["smooth_alpha"]
    ]
    assert any(t.passed for t in smoothed)
    assert found.best is not None and found.best.mode == "int8-dynamic"
