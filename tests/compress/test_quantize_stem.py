"""The image stem under static int8: padded to 4 channels (same outputs), or kept float; real ORT sessions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgectl.compress.data import SampleSet
from edgectl.compress.graph import cpu_session
from edgectl.compress.metrics import cosines
from edgectl.compress.passes.cleanup import cleanup
from edgectl.compress.passes.stem import float_stem_nodes, pad_stem_channels, stem_convs
from edgectl.compress.quantizer import QuantConfig, quantize, stem_variants
from tests.compress.conftest import outlier_mlp


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def infer(path: Path, x: np.ndarray) -> np.ndarray:
    session = cpu_session(path)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.fixture(scope="module")
def residual(residual_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stem") / "residual.clean.onnx"
    cleanup(residual_onnx, out)
    return out


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((24, 3, 16, 16)).astype(np.float32)


def test_the_stem_is_the_conv_reading_the_image(residual: Path, tiny_onnx: Path) -> None:
    model = onnx.load(str(residual))
    stems = stem_convs(model)
    assert len(stems) == 1 and stems[0].input[0] == model.graph.input[0].name
    kept = float_stem_nodes(model)
    assert [n.op_type for n in model.graph.node if n.name in kept] == ["Conv", "Relu"]
    assert len(stem_convs(onnx.load(str(tiny_onnx)))) == 1  # a 1-channel image is a stem too


def test_no_stem_in_a_model_without_an_image_conv(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    outlier_mlp(path)
    assert stem_convs(onnx.load(str(path))) == []
    assert stem_variants(path, [QuantConfig("int8-static", "QOperator")]) == []


@pytest.mark.parametrize("fixture,channels", [("residual", 3), ("tiny_onnx", 1)])
def test_padding_the_stem_keeps_every_output(
    fixture: str, channels: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(fixture)
    side = 16 if channels == 3 else 8
    x = np.random.default_rng(0).standard_normal((4, channels, side, side)).astype(np.float32)
    dst = tmp_path / "padded.onnx"
    assert pad_stem_channels(src, dst) == 1
    padded = onnx.load(str(dst))
    onnx.checker.check_model(padded)
    conv = stem_convs(padded)
    assert conv == []  # the conv now reads the Pad's output, not the image
    weights = {i.name: i for i in padded.graph.initializer}
    first = next(n for n in padded.graph.node if n.op_type == "Conv")
    assert weights[first.input[1]].dims[1] == 4 and ops(dst)["Pad"] == 1
    np.testing.assert_allclose(infer(dst, x), infer(src, x), rtol=1e-5, atol=1e-5)


def test_an_aligned_stem_is_not_padded(tmp_path: Path, residual: Path, rgb: np.ndarray) -> None:
    once = tmp_path / "once.onnx"
    pad_stem_channels(residual, once)
    assert pad_stem_channels(once, tmp_path / "twice.onnx") == 0  # already 4 channels, no stem left
    variants = stem_variants(
        residual, [QuantConfig("int8-static", "QDQ"), QuantConfig("int8-static", "QOperator")]
    )
    assert [(v.fmt, v.stem) for v in variants] == [("QOperator", "pad"), ("QOperator", "float")]


def test_padding_the_quantized_image_gives_the_same_model_output(
    residual: Path, rgb: np.ndarray, tmp_path: Path
) -> None:
    import shutil

    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgectl.compress.passes.stem import quantize_before_pad
    from edgectl.compress.quantizer import _Reader

    padded, before, after = tmp_path / "padded.onnx", tmp_path / "float_pad.onnx", tmp_path / "u8_pad.onnx"
    pad_stem_channels(residual, padded)
    quantize_static(str(padded), str(before), _Reader(SampleSet({"image": rgb[:16]}, None, "c")),
                    quant_format=QuantFormat.QOperator, per_channel=True)  # fmt: skip
    shutil.copy(before, after)
    assert quantize_before_pad(after) == 1
    assert quantize_before_pad(after) == 0  # the Pad no longer reads the graph input
    onnx.checker.check_model(onnx.load(str(after)))
    np.testing.assert_array_equal(infer(after, rgb[16:]), infer(before, rgb[16:]))


@pytest.mark.parametrize("stem", ["pad", "float"])
def test_stem_variants_quantize_and_track_float(
    stem: str, residual: Path, rgb: np.ndarray, tmp_path: Path
) -> None:
    dst = tmp_path / f"{stem}.onnx"
    config = QuantConfig("int8-static", "QOperator", "u8", "s8", per_channel=True, stem=stem)  # type: ignore[arg-type]
    quantize(residual, dst, config, SampleSet({"image": rgb[:16]}, None, "calib"))
    counts = ops(dst)
    if stem == "float":
        assert counts["Conv"] == 1 and counts["QLinearConv"] >= 3  # only the stem stays float
    else:
        assert counts["Conv"] == 0 and counts["Pad"] == 1
        first, second = onnx.load(str(dst)).graph.node[:2]
        assert (first.op_type, second.op_type) == ("QuantizeLinear", "Pad")  # the u8 image is padded
    assert "float-stem" in config.label() or "stem-pad4" in config.label()
    cos = cosines([infer(residual, rgb[16:])], [infer(dst, rgb[16:])])
    assert float(cos.mean()) > 0.98


def test_the_pipeline_times_the_stem_candidates_and_the_artifact_keeps_the_3_channel_input(
    residual_onnx: Path, rgb: np.ndarray, tmp_path: Path
) -> None:
    from edgectl.compress.evaluate import Latency
    from edgectl.compress.pipeline import CompressRequest, run
    from edgectl.compress.recipe import Recipe

    def pad_is_fastest(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        # Deterministic stand-in for the clock: a model with the stem's Pad is the fastest.
        return [Latency(1.0 if ops(m)["Pad"] else 2.0, 2.0, 10) for m in models]

    np.savez(tmp_path / "calib.npz", image=rgb[:16])
    np.savez(tmp_path / "eval.npz", image=rgb[16:])
    out = tmp_path / "art"
    result = run(
        CompressRequest(model=str(residual_onnx), out_dir=out, recipe=Recipe.from_options(quantize="int8-static"),
                        calib=tmp_path / "calib.npz", eval=tmp_path / "eval.npz", max_drop=0.02, timer=pad_is_fastest)
    )  # fmt: skip
    stems = {
        t.config.get("stem") for t in result.trials if t.config and t.config.get("mode") == "int8-static"
    }
    assert {"int8", "pad", "float"} <= stems
    assert result.chosen.config and result.chosen.config["stem"] == "pad"
    session = cpu_session(out / "model.onnx")
    assert session.get_inputs()[0].shape[1] == 3  # the padding is inside the graph, not the user's problem
    cos = cosines([infer(residual_onnx, rgb[16:])], [infer(out / "model.onnx", rgb[16:])])
    assert float(cos.mean()) > 0.98


def test_within_timing_noise_the_smaller_file_wins_but_a_few_bytes_do_not_beat_speed() -> None:
    from edgectl.compress.choice import fastest_passing as _choose
    from edgectl.compress.evaluate import Latency, Trial

    def trial(name: str, ms: float, size: int) -> Trial:
        return Trial(name, "format", latency=Latency(ms, ms, 10), size_bytes=size)

    plain, padded = trial("plain", 1.02, 1_000_000), trial("stem-pad4", 1.00, 1_000_600)
    assert _choose([plain, padded]).name == "stem-pad4"  # the same weights, 600 bytes more: speed decides
    int4 = trial("int4", 1.025, 400_000)
    assert _choose([plain, padded, int4]).name == "int4"  # within 3 % and 2.5x smaller
    assert _choose([plain, padded, trial("slow int4", 1.2, 400_000)]).name == "stem-pad4"


def test_a_static_qdq_candidate_of_an_opset_11_export_is_a_valid_model(tmp_path: Path) -> None:
    import warnings

    import torch

    from tests.compress.conftest import TinyCNN, randomize_bn

    src = tmp_path / "op11.onnx"
    images = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(randomize_bn(TinyCNN()), (torch.from_numpy(images[:1]),), str(src), opset_version=11,
                          input_names=["image"], dynamo=False)  # fmt: skip
    dst = tmp_path / "q.onnx"
    # Per-channel DequantizeLinear (axis) is opset 13: written into the opset 11 graph, ORT refused it.
    quantize(
        src,
        dst,
        QuantConfig("int8-static", "QDQ", "s8", "s8", per_channel=True),
        SampleSet({"image": images}, None, "c", fixed_batch=1),
    )
    assert cpu_session(dst).run(None, {"image": images[:1]})[0].shape == (1, 10)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(dst)).graph.node}
