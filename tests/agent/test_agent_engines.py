"""Execution providers and TensorRT engines: build-and-cache on a TensorRT host, reasons everywhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgectl.agent.engines import choose_engine
from edgectl.agent.errors import InferenceError
from edgectl.agent.runtime import CPU, TENSORRT, SessionSettings, load_model
from edgectl.artifact import SigningKey, TrustStore, load_artifact
from edgectl.devices import CudaDevice, HostFacts, load_profile
from tests.agent.conftest import Bundles
from tests.agent.onnx_models import mlp_model, run_direct

CUDA = "CUDAExecutionProvider"
HAS_TRT = TENSORRT in ort.get_available_providers()


@pytest.mark.skipif(
    not HAS_TRT,
    reason=f"onnxruntime {ort.__version__} here has no TensorRT EP (CPU build, no GPU); "
    "needs onnxruntime-gpu with TensorRT libraries on a CUDA host",
)
def test_tensorrt_engine_is_built_on_first_load_and_reused_from_the_cache(tmp_path: Path) -> None:
    path = mlp_model(tmp_path / "m.onnx", (16, 64, 4))
    cache = tmp_path / "engine-cache"
    settings = SessionSettings(providers=(TENSORRT,), intra_op_threads=1, engine_cache_dir=cache)
    first = load_model(path, name="m", version=1, digest="d", settings=settings)
    assert first.provider == TENSORRT, first.fallback_reasons
    engines = {p: p.stat().st_mtime_ns for p in cache.rglob("*.engine")}
    assert engines, f"no engine written to {cache}"
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    want = run_direct(path, {"x": x})["y"]
    np.testing.assert_allclose(first.run({"x": x})["y"], want, rtol=1e-3, atol=1e-3)
    # A restart loads the same model: the cached engine is deserialized, not rebuilt.
    second = load_model(path, name="m", version=1, digest="d", settings=settings)
    assert second.provider == TENSORRT
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.engine")} == engines
    np.testing.assert_allclose(second.run({"x": x})["y"], want, rtol=1e-3, atol=1e-3)


def test_missing_providers_fall_back_along_the_chain_with_reasons(tmp_path: Path) -> None:
    path = mlp_model(tmp_path / "m.onnx", (16, 64, 4))
    available = ort.get_available_providers()
    model = load_model(
        path,
        name="m",
        version=1,
        digest="d",
        settings=SessionSettings(providers=(TENSORRT, CUDA, CPU), intra_op_threads=1),
    )
    expected = next(ep for ep in (TENSORRT, CUDA, CPU) if ep in available)
    assert model.provider == expected
    for ep in (TENSORRT, CUDA):
        if ep not in available:
            assert any(r.startswith(f"{ep}: not built into this onnxruntime") for r in model.fallback_reasons)


def test_engine_choice_says_why_it_builds_on_the_device(
    tmp_path: Path, bundles: Bundles, signing_key: SigningKey
) -> None:
    art = bundles.build(version=1, target_profile="x86-gpu")
    trust = TrustStore()
    trust.add(signing_key.public_key)
    artifact = load_artifact(art.root, trust)
    gpu_profile = load_profile("x86-gpu")
    cpu_host = HostFacts(
        machine="x86_64",
        cpu_model="test",
        cpu_flags=frozenset({"avx2", "fma"}),
        memory_total_mib=8192,
        tensorrt_absent_reason="tensorrt is not installed",
    )
    choice = choose_engine(artifact, gpu_profile, cpu_host)
    assert choice.prebuilt is None and "tensorrt is not installed" in choice.reason
    gpu_host = dataclasses.replace(
        cpu_host,
        tensorrt_version="10.3.0",
        tensorrt_absent_reason=None,
        cuda_devices=(CudaDevice(0, "NVIDIA L4", "8.9", 23034),),
    )
    choice = choose_engine(artifact, gpu_profile, gpu_host)
    assert choice.prebuilt is None and "builds one and caches it" in choice.reason
    choice = choose_engine(artifact, load_profile("x86-cpu-avx2"), gpu_host)
    assert choice.prebuilt is None and "does not use TensorRT" in choice.reason


def test_a_run_that_fails_in_the_bound_session_is_repeated_through_the_public_api(tmp_path: Path) -> None:
    """Runs go to onnxruntime's bound C++ session (skipping InferenceSession.run's per-call checks);
    one that fails there is repeated through InferenceSession.run, whose own failure handling
    (retry on the next execution provider) thus still applies, and whose error is the one raised."""
    path = mlp_model(tmp_path / "m.onnx", (4, 8, 3))
    model = load_model(path, name="m", version=1, digest="d", settings=SessionSettings(intra_op_threads=1))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(
        model.run({"x": x})["y"], run_direct(path, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )
    public = model.session.run
    through_public: list[object] = []

    def watched(*args: object, **kw: object) -> object:
        through_public.append(args[0])
        return public(*args, **kw)  # type: ignore[arg-type]

    model.session.run = watched  # type: ignore[method-assign]
    model.run({"x": x})
    assert through_public == []  # the bound session answered
    with pytest.raises(InferenceError, match="failed"):
        model.run({"x": np.ones((2, 5), np.float32)})  # unvalidated on purpose: onnxruntime refuses it
    assert through_public == [["y"]]  # repeated once through the public API
