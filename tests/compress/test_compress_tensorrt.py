"""TensorRT engines: built with the real TensorRT Python API where TensorRT and a GPU are present;
elsewhere the manifest must say the engine is to be built on the device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgectl.compress.passes.tensorrt import TensorRTConfig, build_engine, tensorrt_available
from edgectl.compress.pipeline import CompressRequest, run
from edgectl.compress.recipe import Recipe

HAVE_TRT, WHY = tensorrt_available()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are here: test_engine_is_built covers this machine")
def test_without_tensorrt_the_manifest_defers_the_engine_to_the_device(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    np.savez(tmp_path / "calib.npz", image=images)
    recipe = Recipe.from_options(quantize="none", tensorrt=True)
    out = tmp_path / "out"
    run(CompressRequest(model=str(tiny_onnx), out_dir=out, profile="jetson-orin-nano", recipe=recipe,
                        calib=tmp_path / "calib.npz", latency_rounds=2))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    trt = manifest["recipe"]["tensorrt"]
    assert trt["build_on_device"] is True and trt["path"] is None
    assert "build the engine on the device" in trt["reason"]
    assert manifest["engine_build_on_device"] is True
    assert not (out / "engines").exists()


@pytest.mark.skipif(not HAVE_TRT, reason=f"{WHY}: engines are built on the device there")
def test_engine_is_built_with_a_dynamic_batch_profile_and_metadata(tiny_onnx: Path, tmp_path: Path) -> None:
    import tensorrt as trt

    cache = tmp_path / "timing.cache"
    result = build_engine(
        tiny_onnx, tmp_path / "m.engine", TensorRTConfig(precision="fp16", max_batch=4), int8=False,
        timing_cache=cache,
    )  # fmt: skip
    assert result.path is not None and result.path.stat().st_size > 0 and not result.build_on_device
    assert result.tensorrt_version == trt.__version__ and result.compute_capability
    assert cache.stat().st_size > 0
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(result.path.read_bytes())
    name = engine.get_tensor_name(0)
    lo, _, hi = engine.get_tensor_profile_shape(name, 0)
    assert lo[0] == 1 and hi[0] == 4
