"""The quantization search on a tiny MLP with an outlier channel: real quantizer, real ORT sessions."""

from __future__ import annotations

from collections.abc import Sequence
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


def test_a_candidate_raced_slower_than_the_model_to_beat_is_not_evaluated_further(tmp_path: Path) -> None:
    """Deterministic race (speed is never asserted): weight-only models (MatMulNBits) take 3 ms, the
    float model 2 ms, int8 models 1 ms. The weight-only candidate stops after its first slice with
    the reason in its row; int8 candidates are scored in full and the fastest passing one leads."""
    import onnx

    from edgectl.compress.evaluate import Latency, QualityGate
    from edgectl.compress.passes.base import PassContext
    from edgectl.compress.passes.pace import Pace, pace_for

    src = tmp_path / "mlp.onnx"
    data = outlier_mlp(src)
    ev = Evaluator(src, data)

    def ms(path: Path) -> float:
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        return 3.0 if "MatMulNBits" in ops else 2.0 if path == src else 1.0

    raced: list[Path] = []

    def race(models: Sequence[Path]) -> list[Latency]:
        raced.append(models[0])
        return [Latency(ms(p), ms(p), 1) for p in models]

    pace = Pace(race, src, "the float model")
    (tmp_path / "s").mkdir()
    found = QuantSearch(ev, None, tmp_path / "s", 1.0, lambda _m: None, pace=pace).run(
        src,
        QuantizeConfig(mode="auto"),
        ["int8-dynamic", "int8-weight"],
        load_profile("x86-cpu-avx2"),
        vnni=False,
    )
    weight = next(t for t in found.trials if t.config and t.config["mode"] == "int8-weight")
    assert not weight.passed and weight.quality is not None
    assert "raced first: 3 ms against 1 ms" in weight.note and "not evaluated further" in weight.note
    int8 = [t for t in found.trials if t.config and t.config["mode"] == "int8-dynamic" and t.quality]
    assert int8 and all("raced" not in t.note for t in int8) and any(t.passed for t in int8)
    assert pace.leader != src and pace.leader in {t.path for t in int8 if t.passed}
    assert weight.path in raced
    # On a model this small a full evaluation costs less than a race: no pace at all.
    ctx = PassContext(tmp_path, load_profile("x86-cpu-avx2"), ev, QualityGate(1.0), None, vnni=False)
    assert pace_for(ctx, src, 8) is None
