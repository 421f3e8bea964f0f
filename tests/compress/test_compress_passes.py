"""Clean-up, quantization, sensitivity ranking and recipes on tiny models, with real ORT sessions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError
from edgectl.compress.evaluate import Evaluator, measure_latency
from edgectl.compress.graph import cpu_session, model_stats
from edgectl.compress.passes.cleanup import CleanupConfig, cleanup
from edgectl.compress.passes.mixed_precision import MixedPrecisionConfig, exclusion_steps
from edgectl.compress.passes.quant_modes import QuantizeConfig
from edgectl.compress.quantizer import QuantConfig, quantize
from edgectl.compress.recipe import Recipe
from edgectl.compress.sensitivity import rank_nodes
from tests.compress.conftest import outlier_mlp


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def clean(tiny_bn_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "clean.onnx"
    cleanup(tiny_bn_onnx, out)
    return out


def test_cleanup_folds_batchnorm_and_keeps_outputs(
    tiny_bn_onnx: Path, tmp_path: Path, images: np.ndarray
) -> None:
    report = cleanup(tiny_bn_onnx, tmp_path / "c.onnx")
    assert report.batchnorm_before == 2 and report.batchnorm_after == 0
    assert report.nodes_after < report.nodes_before
    feed = {"image": images[:8]}
    want = cpu_session(tiny_bn_onnx).run(None, feed)[0]
    got = cpu_session(tmp_path / "c.onnx").run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    model = onnx.load(str(tmp_path / "c.onnx"))
    assert all(n.name for n in model.graph.node)
    assert any(p.key == "onnx.quant.pre_process" for p in model.metadata_props)


@pytest.mark.parametrize(
    ("config", "int8_op"),
    [
        (QuantConfig("int8-dynamic", "QOperator", "u8", "s8", per_channel=False), "ConvInteger"),
        (QuantConfig("int8-static", "QDQ", "u8", "s8", calibration="minmax"), "DequantizeLinear"),
        (QuantConfig("int8-static", "QOperator", "u8", "s8", calibration="percentile"), "QLinearConv"),
        (QuantConfig("int8-static", "QDQ", "s8", "s8", calibration="entropy"), "DequantizeLinear"),
    ],
)
def test_quantize_modes_give_int8_models_that_track_float(
    clean: Path, tmp_path: Path, images: np.ndarray, config: QuantConfig, int8_op: str
) -> None:
    data = SampleSet({"image": images}, None, "test")
    out = tmp_path / "q.onnx"
    quantize(clean, out, config, data)
    assert ops(out)[int8_op] > 0
    assert out.stat().st_size < clean.stat().st_size / 2
    quality = Evaluator(clean, data).quality(out)
    assert quality.metric == "cosine" and quality.score > 0.95


def test_fp16_keeps_float32_io(clean: Path, tmp_path: Path, images: np.ndarray) -> None:
    out = tmp_path / "h.onnx"
    quantize(clean, out, QuantConfig("fp16"))
    model = onnx.load(str(out))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    got = cpu_session(out).run(None, {"image": images[:4]})[0]
    want = cpu_session(clean).run(None, {"image": images[:4]})[0]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_static_quantization_needs_calibration(clean: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="calib"):
        quantize(clean, tmp_path / "q.onnx", QuantConfig("int8-static"), None)


def test_excluded_nodes_stay_float(clean: Path, tmp_path: Path, images: np.ndarray) -> None:
    data = SampleSet({"image": images}, None, "test")
    ranked = rank_nodes(clean, data, QuantConfig("int8-static"))
    assert {r.op_type for r in ranked} <= {"Conv", "Gemm", "MatMul"} and len(ranked) == 3
    assert [r.error for r in ranked] == sorted((r.error for r in ranked), reverse=True)
    assert all(r.error > 0 for r in ranked)
    worst = ranked[0].node
    out = tmp_path / "q.onnx"
    quantize(clean, out, QuantConfig("int8-static", "QOperator", exclude=(worst,)), data)
    names = {n.name for n in onnx.load(str(out)).graph.node}
    assert worst in names  # still the float op, under its own name
    assert exclusion_steps(ranked * 4, MixedPrecisionConfig(max_float_fraction=0.5)) == [1, 2, 4, 6]


def test_latency_and_stats_are_measured(clean: Path, tiny_onnx: Path, images: np.ndarray) -> None:
    feed = {"image": images[:1]}
    a, b = measure_latency([clean, tiny_onnx], feed, rounds=2, round_s=0.01)
    assert 0 < a.p50_ms <= a.p90_ms and a.runs >= 4 and b.runs >= 4
    stats = model_stats(clean, feed)
    # conv1: 16*8*8*1*9, conv2: 32*8*8*16*9, fc: 512*10
    assert stats.macs == 16 * 64 * 9 + 32 * 64 * 16 * 9 + 512 * 10
    assert stats.params > 5000


def test_recipe_round_trips_and_rejects_mistakes(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(
        {"passes": ["cleanup", {"prune": {"ratio": 0.25}}, {"quantize": {"mode": "int8-dynamic"}}]}
    )
    assert recipe.get("prune").ratio == 0.25 and recipe.get("quantize") == QuantizeConfig(mode="int8-dynamic")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - cleanup\n  - quantize: {mode: fp16, search: false}\n")
    assert Recipe.load(path).get("quantize").search is False
    bad = [
        ({"passes": ["sharpen"]}, "unknown pass"),
        ({"passes": [{"prune": {"ration": 0.5}}]}, "unknown parameter"),
        ({"passes": ["quantize", "cleanup"]}, "order"),
        ({"passes": [{"quantize": {"mode": "int4"}}]}, "mode"),
        ({"passes": [{"prune": {"ratio": "half"}}]}, "ratio"),
        ({"steps": []}, "passes"),
    ]
    for data, match in bad:
        with pytest.raises(BadInputError, match=match):
            Recipe.from_dict(data)


def test_smoothquant_keeps_the_function_and_rescues_outlier_channels(tmp_path: Path) -> None:
    from edgectl.compress.passes.smooth import smooth

    src = tmp_path / "mlp.onnx"
    data = outlier_mlp(src)
    assert smooth(src, tmp_path / "s.onnx", data, alpha=0.7) == 2
    ev = Evaluator(src, data)
    assert ev.quality(tmp_path / "s.onnx").score > 0.99999  # same function, rescaled
    plain, smoothed = tmp_path / "q1.onnx", tmp_path / "q2.onnx"
    base = QuantConfig("int8-dynamic", "QOperator", "u8", "s8", per_channel=True)
    quantize(src, plain, base)
    quantize(src, smoothed, base.with_(smooth_alpha=0.7), data)
    assert 1 - ev.quality(smoothed).score < 1 - ev.quality(plain).score


def test_smoothing_is_done_once_per_alpha_for_every_format_of_a_search(tmp_path: Path) -> None:
    """With a cache folder (as a search has), the format candidates share one smoothed model, and a
    second alpha reuses the measured activation maxima: both give the models an uncached run gives."""
    src = tmp_path / "mlp.onnx"
    data = outlier_mlp(src)
    cache = tmp_path / "cache"
    base = QuantConfig("int8-dynamic", "QOperator", "u8", "s8", per_channel=True, smooth_alpha=0.7)
    formats = [base, base.with_(activations="u8", weights="u8"), base.with_(reduce_range=True)]
    for i, config in enumerate(formats):
        quantize(src, tmp_path / f"cached{i}.onnx", config, data, cache=cache)
        quantize(src, tmp_path / f"plain{i}.onnx", config, data)
        cached, plain = (
            onnx.load(str(tmp_path / f"cached{i}.onnx")),
            onnx.load(str(tmp_path / f"plain{i}.onnx")),
        )
        assert [i.raw_data for i in cached.graph.initializer] == [i.raw_data for i in plain.graph.initializer]
    assert len(list(cache.glob("*.smooth0.7.onnx"))) == 1
    assert len(list(cache.glob("*.amax.npz"))) == 1
    quantize(src, tmp_path / "cached05.onnx", base.with_(smooth_alpha=0.5), data, cache=cache)
    quantize(src, tmp_path / "plain05.onnx", base.with_(smooth_alpha=0.5), data)
    cached, plain = onnx.load(str(tmp_path / "cached05.onnx")), onnx.load(str(tmp_path / "plain05.onnx"))
    assert [i.raw_data for i in cached.graph.initializer] == [i.raw_data for i in plain.graph.initializer]
    assert len(list(cache.glob("*.amax.npz"))) == 1 and len(list(cache.glob("*.smooth0.5.onnx"))) == 1
    assert not list(cache.glob("*.part"))


def test_cleanup_fuses_a_transformer_block_and_keeps_its_outputs(tmp_path: Path) -> None:
    import warnings

    import torch

    class Block(torch.nn.Module):
        """Post-norm self-attention and a GELU MLP, the BERT layer shape."""

        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1) @ v
            x = self.ln1(x + self.out(att))
            return self.ln2(x + self.down(torch.nn.functional.gelu(self.up(x))))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    block = Block().eval()
    x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
    src = tmp_path / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            block, (torch.from_numpy(x),), str(src), dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17,
        )  # fmt: skip
    want = cpu_session(src).run(None, {"x": x})[0]
    # Where asked to (not the CPU default: ORT's CPU kernel of it is slower, test_compress_residual).
    report = cleanup(src, tmp_path / "fused.onnx", CleanupConfig(residual_unfused=False))
    assert report.fused.get("SkipLayerNormalization", 0) >= 1, report.fused
    assert "SkipLayerNormalization" in ops(tmp_path / "fused.onnx")
    np.testing.assert_allclose(cpu_session(tmp_path / "fused.onnx").run(None, {"x": x})[0], want, atol=1e-4)
    default = cleanup(src, tmp_path / "default.onnx")
    assert default.fused and "SkipLayerNormalization" not in default.fused and default.residual_sums == 2
    assert "SkipLayerNormalization" not in ops(tmp_path / "default.onnx")
    np.testing.assert_allclose(cpu_session(tmp_path / "default.onnx").run(None, {"x": x})[0], want, atol=1e-4)
    off = cleanup(src, tmp_path / "plain.onnx", CleanupConfig(fuse_transformer=False))
    assert off.fused == {} and "SkipLayerNormalization" not in ops(tmp_path / "plain.onnx")


def test_a_transformer_fusion_that_fails_half_way_leaves_the_graph_as_it_was(tmp_path: Path) -> None:
    """ORT's BERT fusions rewrite the proto in place; on a GPT-2 export they raised "Graph is not a
    DAG" after fusing FastGelu, and clean-up kept the half-rewritten graph: ORT refused to load it
    (a node reads a tensor no node writes) and ``edgectl compress`` crashed with a traceback."""
    import os
    import warnings

    import torch

    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    gpt2 = transformers.GPT2Model(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = gpt2

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # type: ignore[no-any-return]

    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    src = tmp_path / "gpt2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(), (ids, mask), str(src), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["h"],
            dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "h": {0: "b", 1: "t"}},
        )  # fmt: skip
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    want = cpu_session(src).run(None, feed)[0]
    for label, config_ in [("default", CleanupConfig()), ("skipnorm", CleanupConfig(residual_unfused=False))]:
        dst = tmp_path / f"{label}.onnx"
        cleanup(src, dst, config_)
        np.testing.assert_allclose(cpu_session(dst).run(None, feed)[0], want, atol=1e-4)
