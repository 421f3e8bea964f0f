"""``--quantize auto`` decides by measurement; transforms and artifacts are never slower than their input.

Real quantizer, real ORT sessions on tiny graphs. Speed is never asserted: where the choice
depends on it, a deterministic timer (``cost_model`` or a named-file rule) stands in for the clock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError, QualityGateError
from edgectl.compress.evaluate import Evaluator, Latency
from edgectl.compress.metrics import parse_metric
from edgectl.compress.pipeline import CompressRequest, run
from edgectl.compress.quantizer import QuantConfig, float_by_rule, quantize
from edgectl.compress.recipe import Recipe
from tests.compress.conftest import cost_model, masked_attention, token_samples

MASK_NODES = {"mask_bias", "mask_unsqueeze", "apply_mask", "softmax"}


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_auto_tries_dynamic_even_with_calibration_data_and_keeps_the_one_that_fits(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    # Calibration data at a quarter of the real scale: static int8 clips real activations, dynamic
    # int8 measures each batch and does not care. A careful user's --calib can still mislead static.
    calib = _npz(tmp_path / "calib.npz", token_samples(32, seed=1, scale=0.25))
    evals = _npz(tmp_path / "eval.npz", token_samples(32, seed=2))
    out = tmp_path / "out"
    result = run(
        CompressRequest(model=str(model), out_dir=out, recipe=Recipe.from_options(quantize="auto"), calib=calib,
                        eval=evals, max_drop=0.005, metric="masked-cosine:mask", timer=cost_model)
    )  # fmt: skip
    modes = {str(t.config["mode"]) for t in result.trials if t.config and "mode" in t.config}
    # Every mode the CPU target runs; the graph has MatMul weights, so the weight-only ones too.
    assert modes == {"int8-dynamic", "int8-static", "int8-weight", "int4-weight"}
    assert result.chosen.config and result.chosen.config["mode"] == "int8-dynamic"
    static = [t for t in result.trials if t.config and t.config["mode"] == "int8-static"]
    assert static and not any(t.passed for t in static)
    # Far outside the budget on the first slice: scored no further and never timed.
    assert any("hopeless" in t.note and t.latency is None for t in static)
    manifest = json.loads((out / "manifest.json").read_text())
    rules = manifest["recipe"]["quantize"]["float_by_rule"]
    assert set(rules) == MASK_NODES and all("inf" in why for why in rules.values())
    assert all(set(t.config["keep_float"]) == MASK_NODES for t in static if t.config)  # type: ignore[arg-type]
    assert manifest["recipe"]["quantize"]["mode"] == "int8-dynamic"
    assert manifest["metrics"]["quality_metric"] == "masked-cosine:mask"
    assert manifest["metrics"]["compressed_quality"] >= 0.995


def test_static_calibration_survives_a_minus_inf_mask(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    calib = SampleSet(token_samples(32, seed=1), None, "calib")
    ev = Evaluator(model, SampleSet(token_samples(32, seed=2), None, "eval"),
                   metric=parse_metric("masked-cosine:mask", input_names=["x", "mask"], has_labels=False))  # fmt: skip
    rules = float_by_rule(model, calib)
    assert set(rules) == MASK_NODES
    scores = {}
    for name, config in {
        "no rule": QuantConfig("int8-static"),
        "minmax": QuantConfig("int8-static", keep_float=tuple(rules)),
        "percentile": QuantConfig("int8-static", calibration="percentile", keep_float=tuple(rules)),
        "entropy": QuantConfig("int8-static", calibration="entropy", keep_float=tuple(rules)),
    }.items():
        out = tmp_path / f"{name}.onnx"
        quantize(model, out, config, calib)
        scores[name] = ev.quality(out).score
    # Without the rule the -inf enters an int8 range and the attention falls apart (what users saw).
    assert scores["no rule"] < 0.9
    # With it, int8 keeps the block: 0.9999 on AVX-512 VNNI, 0.9976 without VNNI, where ORT's U8S8
    # kernels saturate the odd product (a host property, not the rule's).
    assert min(scores["minmax"], scores["percentile"], scores["entropy"]) > 0.995


def test_auto_writes_nothing_when_no_quantized_model_is_faster(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    evals = _npz(tmp_path / "eval.npz", token_samples(32, seed=2))

    def same_speed(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        return [Latency(1.0, 1.0, 1) for _ in models]

    out = tmp_path / "out"
    request = CompressRequest(model=str(model), out_dir=out, recipe=Recipe.from_options(quantize="auto"),
                              eval=evals, max_drop=0.02, timer=same_speed)  # fmt: skip
    with pytest.raises(QualityGateError, match="faster than the float model") as caught:
        run(request)
    assert "--quantize none" in str(caught.value.hint)
    assert caught.value.trials and any(
        t["passed"] for t in caught.value.trials[1:]
    )  # it fit, but was no faster
    assert not out.exists()
    # Asked for explicitly, the same models are written (the CLI warns that they are not faster).
    written = run(
        CompressRequest(model=str(model), out_dir=tmp_path / "dyn", recipe=Recipe.from_options(quantize="int8-dynamic"),
                        eval=evals, max_drop=0.02, timer=same_speed)
    )  # fmt: skip
    assert written.chosen.passed and (tmp_path / "dyn" / "manifest.json").is_file()


def test_auto_races_costly_candidates_first_and_says_when_all_were_slower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a full evaluation costs more than a race (here: always), each quantized candidate is raced
    against the float model first; all clearly slower ones stop there and the refusal says so."""
    from edgectl.compress.passes import pace

    monkeypatch.setattr(pace, "WORTH_RACING_S", 0.0)
    model = masked_attention(tmp_path / "attn.onnx")
    evals = _npz(tmp_path / "eval.npz", token_samples(32, seed=2))

    def float_fastest(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        return [Latency(1.0 if p == model or "clean" in p.name else 5.0, 1.0, 1) for p in models]

    out = tmp_path / "out"
    request = CompressRequest(model=str(model), out_dir=out, recipe=Recipe.from_options(quantize="auto"),
                              eval=evals, max_drop=0.02, timer=float_fastest)  # fmt: skip
    with pytest.raises(QualityGateError, match="raced clearly slower before their full evaluation") as caught:
        run(request)
    assert "--quantize none" in str(caught.value.hint) and not out.exists()
    raced = [t for t in caught.value.trials if "raced first" in str(t["note"])]
    assert raced and all(t["passed"] is False and t["quality"] is not None for t in raced)
    assert all("for the float model" in str(t["note"]) for t in raced)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("cleanup_slower", [True, False])
def test_a_slower_cleanup_is_discarded(
    tiny_bn_onnx: Path, images: np.ndarray, tmp_path: Path, cleanup_slower: bool
) -> None:
    def timer(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        # The rewritten graphs (clean-N.onnx) are "slower" than their input; the shapes-only copy is not.
        slow = [cleanup_slower and p.name.startswith("clean-") and "shapes" not in p.name for p in models]
        return [Latency(2.0 if s else 1.0, 2.0 if s else 1.0, 1) for s in slow]

    assert "BatchNormalization" in _ops(tiny_bn_onnx)
    evals = _npz(tmp_path / "eval.npz", {"image": images})
    out = tmp_path / "out"
    run(CompressRequest(model=str(tiny_bn_onnx), out_dir=out, recipe=Recipe.from_options(quantize="none"),
                        eval=evals, timer=timer))  # fmt: skip
    record = json.loads((out / "manifest.json").read_text())["recipe"]["cleanup"]
    assert record["timing"]["input_ms"] == 1.0
    if cleanup_slower:
        assert record["kept"] == "input graph (shapes only)" and record["timing"]["full_ms"] == 2.0
        assert "BatchNormalization" in _ops(out / "model.onnx")  # the BN fold was thrown away
    else:
        assert record["kept"] == "full"
        assert "BatchNormalization" not in _ops(out / "model.onnx")


def test_weight_only_modes_use_matmul_nbits_where_the_target_runs_it(tmp_path: Path) -> None:
    model = masked_attention(tmp_path / "attn.onnx")
    evals = _npz(tmp_path / "eval.npz", token_samples(32, seed=2))
    result = run(
        CompressRequest(model=str(model), out_dir=tmp_path / "w4", recipe=Recipe.from_options(quantize="int4-weight"),
                        eval=evals, max_drop=0.02, latency_rounds=1)
    )  # fmt: skip
    assert result.chosen.name == "int4-weight MatMulNBits block 32"
    ops = _ops(tmp_path / "w4" / "model.onnx")
    assert "MatMulNBits" in ops and "MatMul" in ops  # q.k and p.v multiply activations: they stay float
    assert result.metrics["size_ratio"] > 1.0
    with pytest.raises(BadInputError, match="MatMulNBits kernels"):
        run(CompressRequest(model=str(model), out_dir=tmp_path / "trt", profile="jetson-orin-nano",
                            recipe=Recipe.from_options(quantize="int4-weight"), eval=evals))  # fmt: skip
    assert not (tmp_path / "trt").exists()


def test_a_weight_only_mode_on_a_model_without_linear_layers_is_refused(tmp_path: Path) -> None:
    """Weight-only modes quantize MatMul/Gemm weights; a conv-only model has none, and shipping its
    float graph under the mode's name would be a lie: refused, nothing written."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("GlobalAveragePool", ["c"], ["y"])],
        "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 1, 1])], [w],
    )  # fmt: skip
    model = tmp_path / "convs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    evals = _npz(
        tmp_path / "eval.npz", {"x": np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)}
    )
    for mode in ("int8-weight", "int4-weight"):
        with pytest.raises(BadInputError, match="has none") as err:
            run(CompressRequest(model=str(model), out_dir=tmp_path / mode, recipe=Recipe.from_options(quantize=mode),
                                eval=evals))  # fmt: skip
        assert "int8-dynamic" in (err.value.hint or "")
        assert not (tmp_path / mode).exists()


def test_format_candidates_share_one_calibration_run(tmp_path: Path) -> None:
    import inspect

    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        pytest.skip("this onnxruntime cannot reuse calibration ranges: every candidate calibrates")
    model = masked_attention(tmp_path / "attn.onnx")
    calib = SampleSet(token_samples(32, seed=1), None, "calib")
    ev = Evaluator(model, SampleSet(token_samples(32, seed=2), None, "eval"))
    rules = tuple(float_by_rule(model, calib))
    configs = [QuantConfig("int8-static", "QDQ", act, "s8", per_channel=pc, keep_float=rules)
               for act in ("u8", "s8") for pc in (True, False)]  # fmt: skip
    scores = {}
    for cache in (None, tmp_path / "cache"):
        for i, config in enumerate(configs):
            out = tmp_path / f"{cache is not None}-{i}.onnx"
            quantize(model, out, config, calib, cache=cache)
            scores[(cache is not None, i)] = ev.quality(out).score
    assert all(scores[(True, i)] == scores[(False, i)] for i in range(len(configs)))
    # Types and granularity do not change the ranges: four candidates, one calibration.
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_cleanup_is_not_judged_by_timings_off_the_target(
    tiny_bn_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    def cleanup_slower(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        return [Latency(2.0 if p.name.startswith("clean-") else 1.0, 2.0, 1) for p in models]

    evals = _npz(tmp_path / "eval.npz", {"image": images})
    out = tmp_path / "out"
    # x86-gpu runs on CUDA first; this machine has no CUDA EP, so CPU timings prove nothing there.
    run(CompressRequest(model=str(tiny_bn_onnx), out_dir=out, profile="x86-gpu", recipe=Recipe.from_options(quantize="none"),
                        eval=evals, timer=cleanup_slower))  # fmt: skip
    record = json.loads((out / "manifest.json").read_text())["recipe"]["cleanup"]
    assert record["kept"] == "full" and record["timing"].startswith("not timed")
    assert "BatchNormalization" not in _ops(out / "model.onnx")


def test_quantize_none_ships_the_input_when_the_final_timing_finds_the_cleanup_slower(
    tiny_bn_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    """The clean-up pass timed its rewrite as fast as its input; the final timing disagrees (noise,
    or another load): the model as it was given is written, never the slower one."""
    calls = []

    def timer(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        calls.append([p.name for p in models])
        slower = len(calls) > 1  # the clean-up pass's own timing: a tie; the final one: 1.5x
        return [Latency(1.5 if slower and p.name.startswith("clean") else 1.0, 1.0, 1) for p in models]

    evals = _npz(tmp_path / "eval.npz", {"image": images})
    out = tmp_path / "out"
    result = run(CompressRequest(model=str(tiny_bn_onnx), out_dir=out, recipe=Recipe.from_options(quantize="none"),
                                 eval=evals, timer=timer))  # fmt: skip
    assert len(calls) == 2 and any(name.startswith("clean") for name in calls[1])
    assert result.chosen.stage == "baseline"
    assert "BatchNormalization" in _ops(out / "model.onnx")  # the input's graph, BN unfolded


def test_auto_ships_the_pruned_float_model_when_no_quantized_one_beats_it(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    def timer(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        # Pruning made the model 3x faster; int8 on top of it is slower than the pruned float model.
        ms = {"pruned": 1.0, "candidate": 1.5}
        return [
            Latency(*[next((v for k, v in ms.items() if p.name.startswith(k)), 3.0)] * 2, 1) for p in models
        ]

    data = _npz(tmp_path / "d.npz", {"image": images})
    out = tmp_path / "out"
    result = run(CompressRequest(model=str(tiny_onnx), out_dir=out, recipe=Recipe.from_options(quantize="auto",
                                 prune="0.25"), calib=data, eval=data, max_drop=0.2, timer=timer))  # fmt: skip
    # It was refused as "no quantized model faster than the float model", the float model being the pruned one.
    assert result.chosen.name == "pruned 25%" and result.chosen.stage == "prune"
    assert result.metrics["speedup"] == 3.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["quantize"]["mode"] is None and set(manifest["precision"].values()) == {"fp32"}


def test_auto_does_not_ship_a_model_within_timing_noise_of_the_float_one(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    def timer(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        # Every quantized candidate 1 % faster: noise on one thread (a Loop model with nothing quantized
        # in it shipped as "int8, 1.0134x faster").
        return [Latency(*[0.99 if p.name.startswith("candidate") else 1.0] * 2, 1) for p in models]

    data = _npz(tmp_path / "d.npz", {"image": images})
    with pytest.raises(
        QualityGateError, match=r"faster than the float model on x86-cpu-vnni \(by more than 2%"
    ):
        run(CompressRequest(model=str(tiny_onnx), out_dir=tmp_path / "out", recipe=Recipe.from_options(quantize="auto"),
                            calib=data, eval=data, max_drop=0.5, timer=timer))  # fmt: skip
    assert not (tmp_path / "out").exists()
