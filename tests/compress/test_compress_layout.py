"""The layout pass: int8 graphs written channels-last compute the same integers; refused off ORT's CPU EP.

Real quantized models (ORT's QOperator quantizer) and real ORT sessions; where the pipeline must
decide by speed, a deterministic timer stands in for the clock.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import Latency
from edgectl.compress.graph import cpu_session
from edgectl.compress.passes.cleanup import cleanup
from edgectl.compress.passes.layout import LayoutConfig, fold_dequantize, refusal, rewrite
from edgectl.compress.quantizer import QuantConfig, cpu_has_vnni, quantize
from edgectl.devices import load_profile
from tests.compress.conftest import ResidualCNN, nn, outlier_mlp, torch

ONLY_NHWC = LayoutConfig(channels_last=True, fold_dequantize=False)


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run_all(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = cpu_session(path)
    return [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: x})]


def int8(src: Path, dst: Path, calib: np.ndarray, **changes: object) -> Path:
    """``src`` cleaned up and quantized as the pipeline's QOperator U8S8 per-channel candidate."""
    clean = dst.with_suffix(".clean.onnx")
    cleanup(src, clean)
    # Without VNNI, ORT's U8S8 kernels add pairs of products in saturating 16 bits, and the NCHW and
    # NHWC kernels pair them differently: full-range weights then differ in the last bits between
    # layouts. The search uses reduced-range weights there ("rr"), which cannot saturate.
    config = QuantConfig("int8-static", "QOperator", "u8", "s8", per_channel=True)
    config = config.with_(**{"reduce_range": not cpu_has_vnni(), **changes})
    quantize(clean, dst, config, SampleSet({"image": calib}, None, "calib"))
    return dst


class Branches(nn.Module):  # type: ignore[misc]
    """Two conv branches concatenated, pooled, flattened into a Linear; also returns the feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(24 * 4 * 4, 6)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.stem(image))
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        y = nn.functional.avg_pool2d(nn.functional.max_pool2d(y, 2), 2)
        return self.fc(torch.flatten(y, 1)), y


def export(module: nn.Module, x: np.ndarray, path: Path, *, outputs: int = 1, spatial: bool = False) -> Path:
    """TorchScript export with a dynamic batch (and height/width with ``spatial``)."""
    names = ["logits", "features"][:outputs]
    axes = {"image": {0: "n", 2: "h", 3: "w"} if spatial else {0: "n"}} | {o: {0: "n"} for o in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=names, dynamic_axes=axes)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((24, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("stem", ["int8", "float", "pad"])
def test_the_digits_shape_runs_without_a_transpose_and_gives_the_same_integers(
    stem: str, tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    q = int8(tiny_onnx, tmp_path / "q.onnx", images[:16], stem=stem)
    out = tmp_path / "nhwc.onnx"
    done = rewrite(q, out, {"image": images[:1]}, ONLY_NHWC)
    report = done.layout
    assert report.converted.get("QLinearConv") == (1 if stem == "float" else 2)
    assert report.converted.get("MaxPool") == 1 and report.weights_permuted == 1 and report.flattens_kept == 1
    # The one-channel image enters by a Reshape; the flattened map feeds the Linear with permuted rows.
    assert report.transposes == (1 if stem != "int8" else 0) and report.reshapes == (stem == "int8")
    counts = ops(out)
    assert counts["NhwcMaxPool"] == 1 and counts["MaxPool"] == 0 and counts["Transpose"] == report.transposes
    onnx.checker.check_model(onnx.load(str(out)))
    for a, b in zip(run_all(q, images[16:]), run_all(out, images[16:]), strict=True):
        np.testing.assert_array_equal(a, b)  # batch 32, probed on batch 1


@pytest.mark.parametrize("shape", [(-1, 512), (0, 512), (1, 512)])
def test_a_reshape_into_the_classifier_is_absorbed_like_a_flatten(
    shape: tuple[int, int], tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    q = int8(tiny_onnx, tmp_path / "q.onnx", images[:16])
    model = onnx.load(str(q))
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    flatten.op_type = "Reshape"
    del flatten.attribute[:]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(shape, np.int64), "flat_shape"))
    flatten.input.append("flat_shape")
    onnx.save(model, str(q))
    x = images[16:17] if shape[0] == 1 else images[16:]
    out = tmp_path / "nhwc.onnx"
    report = rewrite(q, out, {"image": images[:1]}, ONLY_NHWC).layout
    assert report.weights_permuted == 1 and report.transposes == 0 and ops(out)["Reshape"] == 2
    np.testing.assert_array_equal(run_all(out, x)[0], run_all(q, x)[0])


def test_residual_adds_depthwise_convs_and_global_pooling_stay_exact(
    residual_onnx: Path, rgb: np.ndarray, tmp_path: Path
) -> None:
    q = int8(residual_onnx, tmp_path / "q.onnx", rgb[:16])
    out = tmp_path / "nhwc.onnx"
    report = rewrite(q, out, {"image": rgb[:1]}, ONLY_NHWC).layout
    assert report.converted["QLinearConv"] == 5 and report.converted["QLinearAdd"] == 1
    assert report.converted["QLinearGlobalAveragePool"] == 1
    assert report.transposes == 1  # the 3-channel image; the pooled 1x1 map is flattened as it is
    assert report.weights_permuted == 0 and report.flattens_kept == 1
    np.testing.assert_array_equal(run_all(out, rgb[16:])[0], run_all(q, rgb[16:])[0])


def test_concat_pools_and_a_feature_map_read_outside_the_region(rgb: np.ndarray, tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = export(Branches(), rgb[:2], tmp_path / "branches.onnx", outputs=2)
    q = int8(src, tmp_path / "q.onnx", rgb[:16])
    # Also expose a quantized map as a graph output: the region writes it, the output stays NCHW.
    model = onnx.load(str(q))
    concat = next(n for n in model.graph.node if n.op_type == "QLinearConcat")
    model.graph.output.append(helper.make_empty_tensor_value_info(concat.output[0]))
    onnx.save(model, str(q))
    out = tmp_path / "nhwc.onnx"
    report = rewrite(q, out, {"image": rgb[:1]}, ONLY_NHWC).layout
    assert report.converted["QLinearConcat"] == 1 and report.converted["QLinearAveragePool"] == 1
    before, after = run_all(q, rgb[16:]), run_all(out, rgb[16:])
    assert [a.shape for a in after] == [b.shape for b in before]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dynamic_height_and_width_get_transposes_not_shape_bound_rewrites(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x8 = np.random.default_rng(0).random((24, 3, 8, 8), dtype=np.float32)
    src = export(ResidualCNN(), x8[:2], tmp_path / "r.onnx", spatial=True)
    q = int8(src, tmp_path / "q.onnx", x8[:16])
    out = tmp_path / "nhwc.onnx"
    report = rewrite(q, out, {"image": x8[:1]}, ONLY_NHWC).layout
    assert report.changed and report.reshapes == 0
    x12 = np.random.default_rng(1).random((4, 3, 12, 12), dtype=np.float32)  # not the probed size
    np.testing.assert_array_equal(run_all(out, x12)[0], run_all(q, x12)[0])


def test_graphs_without_int8_convolutions_are_left_alone(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    qdq = tmp_path / "qdq.onnx"
    clean = tmp_path / "clean.onnx"
    cleanup(tiny_onnx, clean)
    quantize(clean, qdq, QuantConfig("int8-static", "QDQ"), SampleSet({"image": images[:16]}, None, "c"))
    assert not rewrite(qdq, tmp_path / "a.onnx", {"image": images[:1]}, LayoutConfig()).changed
    mlp, mlp_q = tmp_path / "mlp.onnx", tmp_path / "mlp.q.onnx"
    data = outlier_mlp(mlp)
    quantize(mlp, mlp_q, QuantConfig("int8-static", "QOperator"), data)
    assert not rewrite(mlp_q, tmp_path / "b.onnx", {"x": data.inputs["x"][:1]}, LayoutConfig()).changed
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_a_folded_dequantize_differs_by_at_most_half_an_output_step(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    q = int8(tiny_onnx, tmp_path / "q.onnx", images[:16])
    model = onnx.load(str(q))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    scale = float(
        onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq.input[1]))
    )
    assert fold_dequantize(model) == 1 and fold_dequantize(model) == 0
    assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    onnx.save(model, str(tmp_path / "folded.onnx"))
    # On the calibration images nothing saturates: the only difference is the output's rounding.
    a, b = run_all(q, images[:16])[0], run_all(tmp_path / "folded.onnx", images[:16])[0]
    assert b.dtype == np.float32 and np.abs(a - b).max() <= scale / 2 + 1e-5


@pytest.mark.parametrize("name", ["x86-gpu", "jetson-orin-nano", "jetson-agx-orin"])
def test_profiles_whose_int8_is_not_on_the_cpu_ep_are_refused(name: str) -> None:
    why = refusal(load_profile(name), on_target=True)
    assert why is not None and "CPU EP" in why


def test_cpu_profiles_run_it_only_where_it_can_be_timed() -> None:
    assert refusal(load_profile("x86-cpu-vnni"), on_target=True) is None
    assert refusal(load_profile("arm64-cpu"), on_target=True) is None
    assert "not on this machine" in (refusal(load_profile("x86-cpu-vnni"), on_target=False) or "")


def _has_layout(path: Path) -> bool:
    model = onnx.load(str(path))
    return any(a.name == "channels_last" and a.i for n in model.graph.node for a in n.attribute)


@pytest.mark.parametrize("rewrite_faster", [True, False])
def test_the_pipeline_keeps_the_rewrite_only_where_it_is_not_slower(
    rewrite_faster: bool, tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    import json

    from edgectl.compress.pipeline import CompressRequest, run
    from edgectl.compress.recipe import Recipe

    def timer(models: Sequence[Path], feed: dict[str, np.ndarray]) -> list[Latency]:
        # Deterministic stand-in for the clock: a channels-last graph is 20 % faster (or slower).
        fast = 0.8 if rewrite_faster else 1.2
        return [Latency(fast if _has_layout(m) else 1.0, 1.0, 10) for m in models]

    np.savez(tmp_path / "calib.npz", image=images[:16])
    np.savez(tmp_path / "eval.npz", image=images[16:])
    out = tmp_path / "art"
    result = run(CompressRequest(model=str(tiny_onnx), out_dir=out, recipe=Recipe.from_options(quantize="int8-static"),
                                 calib=tmp_path / "calib.npz", eval=tmp_path / "eval.npz", max_drop=0.05,
                                 timer=timer))  # fmt: skip
    record = json.loads((out / "manifest.json").read_text())["recipe"]["layout"]
    assert record and all(entry["kept"] is rewrite_faster for entry in record.values())
    assert result.chosen.name.endswith("+layout") is rewrite_faster
    assert _has_layout(out / "model.onnx") is rewrite_faster
    session = cpu_session(out / "model.onnx")
    assert session.get_inputs()[0].shape[1:] == [1, 8, 8]  # the user's input stays NCHW


def test_a_tensorrt_profile_skips_the_pass(tiny_onnx: Path, images: np.ndarray, tmp_path: Path) -> None:
    import json

    from edgectl.compress.pipeline import CompressRequest, run
    from edgectl.compress.recipe import Recipe

    np.savez(tmp_path / "calib.npz", image=images[:16])
    out = tmp_path / "art"
    run(CompressRequest(model=str(tiny_onnx), out_dir=out, profile="x86-gpu", max_drop=0.05,
                        recipe=Recipe.from_options(quantize="int8-static"), calib=tmp_path / "calib.npz"))  # fmt: skip
    record = json.loads((out / "manifest.json").read_text())["recipe"]["layout"]
    assert "TensorrtExecutionProvider" in record["skipped"]
    assert not _has_layout(out / "model.onnx")


def test_a_rewrite_that_fails_keeps_its_source(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass is an optimization: a graph form its rewrite cannot read (here it raises) leaves the
    candidate as it was, says why in the manifest, and the run still ships an int8 model."""
    import json

    from edgectl.compress.passes import layout
    from edgectl.compress.pipeline import CompressRequest, run
    from edgectl.compress.recipe import Recipe

    def broken(*args: object, **kw: object) -> None:
        raise KeyError("a graph form the rewrite does not know")

    monkeypatch.setattr(layout, "write_channels_last", broken)
    np.savez(tmp_path / "calib.npz", image=images[:16])
    np.savez(tmp_path / "eval.npz", image=images[16:])
    out = tmp_path / "art"
    result = run(CompressRequest(model=str(tiny_onnx), out_dir=out, recipe=Recipe.from_options(quantize="int8-static"),
                                 calib=tmp_path / "calib.npz", eval=tmp_path / "eval.npz", max_drop=0.05,
                                 timer=lambda models, feed: [Latency(1.0 - 0.1 * (i > 0), 1.0, 10) for i, _ in enumerate(models)]))  # fmt: skip
    record = json.loads((out / "manifest.json").read_text())["recipe"]["layout"]
    assert record and all("rewrite failed: KeyError" in entry["skipped"] for entry in record.values())
    assert not result.chosen.name.endswith("+layout") and not _has_layout(out / "model.onnx")


def test_a_folded_dequantize_leaves_no_initializer_unread(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    # Its scale and zero point stayed in the artifact, and ORT warned "Removing initializer
    # 'output_scale'. It is not used by any node" every time a device loaded it.
    model = onnx.load(str(int8(tiny_onnx, tmp_path / "q.onnx", images[:16])))
    assert fold_dequantize(model) == 1
    read = {x for n in model.graph.node for x in n.input}
    assert [i.name for i in model.graph.initializer if i.name not in read] == []
