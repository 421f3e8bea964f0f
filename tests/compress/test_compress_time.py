"""Where a compress run's time goes, and the search spending less of it: behaviour, never speed.

The stage clock's rows, the paired early stop of interleaved timing (decided on given numbers),
one session and one first slice serving both scores of a candidate, and format candidates of a
hopeless mode not built. Real ORT sessions on tiny graphs; no assertion reads a clock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgectl.compress.clock import StageClock, breakdown_lines
from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import MIN_ROUND_S, Evaluator, measure_latency, out_of_race, runs_per_round
from edgectl.compress.metrics import parse_metric
from edgectl.compress.passes.quant_modes import QuantizeConfig
from edgectl.compress.passes.quantize import QuantSearch
from edgectl.compress.quantizer import QuantConfig, latency_candidates, quantize
from edgectl.devices import load_profile
from tests.compress.conftest import masked_attention, token_samples


def test_a_round_of_a_tiny_model_is_long_enough_to_average_a_scheduler_blip() -> None:
    # 16 us a run: the old cap of 200 runs gave 3 ms rounds; now a round fills MIN_ROUND_S.
    assert runs_per_round(16e-6, 0.15) * 16e-6 >= MIN_ROUND_S * 0.99
    # Never past round_s, never under 2 runs, and a slow model keeps its few runs.
    assert runs_per_round(16e-6, 0.005) * 16e-6 <= 0.005
    assert runs_per_round(1e-3, 0.15) == 150
    assert runs_per_round(1.0, 0.15) == 2
    assert runs_per_round(0.0, 0.15) >= 2


def test_nested_stages_count_once_and_the_lines_add_up() -> None:
    clock = StageClock()
    with clock.stage("pass"):
        for _ in range(3):
            with clock.stage("pass: step"):
                sum(range(1000))
    with clock.stage("pass"):
        pass
    rows = {s.name: s for s in clock.stages}
    assert [s.name for s in clock.stages] == ["pass", "pass: step"]
    assert rows["pass"].count == 2 and rows["pass: step"].count == 3
    assert all(s.wall_s >= 0 and s.cpu_s >= 0 for s in clock.stages)
    lines = breakdown_lines(clock.to_list(), 1.0)
    assert lines[0].startswith("pass ") and "x2" in lines[0] and "x3" in lines[1]
    assert lines[-1].startswith("total (time to artifact)")


def test_a_racer_clearly_slower_in_every_round_stops_being_timed() -> None:
    racing, active = [True, True, True], [True, True, True]
    rounds = [[1.0, 1.1, 1.0], [1.2, 1.3, 1.25], [1.05, 1.3, 1.02]]
    # The second is > 10 % slower than the leader in every round; the third only in one.
    assert out_of_race(rounds, racing, active) == [1]
    # Two rounds are not enough evidence.
    assert out_of_race([r[:2] for r in rounds], racing, active) == []
    # A stopped model is not looked at again, and a lone racer is never stopped.
    assert out_of_race(rounds, racing, [True, False, False]) == []


def test_a_reference_stops_once_the_leader_clearly_beats_it() -> None:
    # Float (a reference) at 2 ms, two int8 racers at about 1 ms: the decision is made.
    rounds = [[2.0, 2.1, 1.9], [1.0, 1.1, 1.0], [1.02, 1.05, 1.0]]
    assert out_of_race(rounds, [False, True, True], [True, True, True]) == [0]
    # A reference the leader does not clearly beat keeps being timed.
    close = [[1.05, 1.1, 1.0], [1.0, 1.0, 1.0]]
    assert out_of_race(close, [False, True], [True, True]) == []


def test_timing_with_references_only_runs_every_round(tiny_onnx: Path, images: np.ndarray) -> None:
    feed = {"image": images[:1]}
    a, b = measure_latency([tiny_onnx, tiny_onnx], feed, rounds=3, round_s=0.005, racing=[False, False])
    assert not a.stopped_early and not b.stopped_early and a.runs >= 6 and b.runs >= 6


def test_the_full_score_reuses_the_first_slice(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    data = SampleSet(token_samples(24, seed=2), None, "tokens")
    ev = Evaluator(
        model, data, metric=parse_metric("masked-cosine:mask", input_names=["x", "mask"], has_labels=False)
    )
    q = tmp_path / "q.onnx"
    # Static ranges: outputs do not depend on how samples are batched (dynamic int8's do).
    calib = SampleSet(token_samples(16, seed=1), None, "calib")
    quantize(model, q, QuantConfig("int8-static", keep_float=("mask_bias", "apply_mask", "softmax")), calib)
    quality, drop, stopped = ev.staged_quality(q, 8, lambda _drop: False)
    assert not stopped
    whole = ev.quality(q)
    assert np.isclose(quality.score, whole.score) and np.isclose(quality.min_cosine, whole.min_cosine)
    assert np.isclose(drop, whole.drop_from(ev.baseline))
    quick, _, stopped = ev.staged_quality(q, 8, lambda _drop: True)
    assert stopped and np.isclose(quick.score, ev.quality(q, samples=8).score)


def test_formats_of_a_hopeless_mode_are_not_built(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    metric = parse_metric("masked-cosine:mask", input_names=["x", "mask"], has_labels=False)
    ev = Evaluator(model, SampleSet(token_samples(32, seed=2), None, "tokens"), metric=metric)
    # Calibration on a tenth of the real scale and no mask rule: static int8 clips everything.
    calib = SampleSet(token_samples(16, seed=1, scale=0.1), None, "calib")
    search = QuantSearch(ev, calib, tmp_path, 0.001, lambda _m: None)
    found = search.run(
        model, QuantizeConfig(mode="int8-static"), "int8-static", load_profile("x86-cpu-vnni"), vnni=True
    )
    lead, *rest = [t for t in found.trials if t.stage == "format"]
    assert "hopeless" in lead.note and lead.quality is not None
    assert rest and all(t.path is None and t.quality is None and "skipped" in t.note for t in rest)


def test_u8u8_is_a_dynamic_candidate_only_without_vnni() -> None:
    def types(vnni: bool) -> set[str]:
        return {c.activations + c.weights for c in latency_candidates("int8-dynamic", vnni=vnni)}

    assert types(vnni=True) == {"u8s8"}
    assert types(vnni=False) == {"u8s8", "u8u8"}


def test_per_tensor_is_not_built_when_per_channel_missed_the_budget(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    metric = parse_metric("masked-cosine:mask", input_names=["x", "mask"], has_labels=False)
    ev = Evaluator(model, SampleSet(token_samples(32, seed=2), None, "tokens"), metric=metric)
    # A budget no int8 model meets, far from hopeless: the per-channel candidate is scored in full.
    search = QuantSearch(ev, None, tmp_path, 1e-7, lambda _m: None)
    step = QuantizeConfig(mode="int8-dynamic")
    found = search.run(model, step, "int8-dynamic", load_profile("x86-cpu-vnni"), vnni=True)
    formats = [t for t in found.trials if t.stage == "format"]
    pc = [t for t in formats if t.config and t.config["per_channel"]]
    per_tensor = [t for t in formats if t.config and not t.config["per_channel"]]
    assert pc and all(t.quality is not None and not t.passed for t in pc)
    assert per_tensor and all(t.path is None and t.quality is None for t in per_tensor)
    assert all("skipped" in t.note and "per-channel" in t.note for t in per_tensor)
    assert any("ORT defaults" in t.note for t in per_tensor)  # the peer's row says what it would have been
