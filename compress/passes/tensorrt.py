"""Build a serialized TensorRT engine from the (QDQ int8 or fp16) ONNX model, where TensorRT runs.

An engine is tied to the TensorRT version and GPU it was built on (Jetson engines are not even
portable across Jetson models), so on a machine without TensorRT and a GPU this records that the
engine must be built on the device instead of shipping one that would not load.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from edgectl.artifact import TrtEngine
from edgectl.compress.errors import CompressError
from edgectl.compress.passes.base import CompressPass, ModelState, PassContext, PassResult
from edgectl.devices import DeviceProfile


@dataclass(frozen=True)
class TensorRTConfig:
    """Engine precision, the batch range of the optimisation profile and the builder workspace."""

    precision: Literal["auto", "fp16", "int8"] = "auto"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mib: int = 1024


@dataclass(frozen=True)
class EngineResult:
    """An engine written to ``path`` and what it is tied to, or why none was built here."""

    path: Path | None
    tensorrt_version: str | None
    compute_capability: str | None
    build_on_device: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return {**self.__dict__, "path": self.path.name if self.path else None}

    @classmethod
    def not_in_recipe(cls, profile: DeviceProfile) -> EngineResult:
        """What the manifest says when the recipe builds no engine for ``profile``."""
        if profile.engine.tensorrt:
            return cls(None, None, None, True, "the recipe builds no engine: build it on the device")
        return cls(None, None, None, False, f"{profile.name} does not use TensorRT")


def compute_capability() -> str | None:
    """The first GPU's compute capability (``8.7``), or None without a visible NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return line.strip() or None


def tensorrt_available() -> tuple[bool, str]:
    """Whether an engine can be built here, and if not, why."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed on this machine"
    if compute_capability() is None:
        return False, "no NVIDIA GPU is visible on this machine"
    return True, "TensorRT and a GPU are present"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    config: TensorRTConfig,
    *,
    int8: bool,
    sparse: bool = False,
    timing_cache: Path | None = None,
) -> EngineResult:
    """Build ``engine_path`` from ``onnx_path`` with the TensorRT Python API, or say why it cannot be."""
    ok, why = tensorrt_available()
    if not ok:
        return EngineResult(None, None, None, True, f"{why}: build the engine on the device")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompressError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    precision = config.precision if config.precision != "auto" else ("int8" if int8 else "fp16")
    if precision == "fp16" or int8:
        cfg.set_flag(trt.BuilderFlag.FP16)  # layers left in float run in fp16 rather than fp32
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        cfg.set_flag(trt.BuilderFlag.INT8)  # the QDQ nodes carry the scales: explicit quantization
    if sparse:
        cfg.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    _add_profile(builder, network, cfg, config)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = cfg.create_timing_cache(cache_bytes)
    cfg.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise CompressError("TensorRT failed to build the engine", hint="see the TensorRT log above")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(cfg.get_timing_cache().serialize()))
    cc = compute_capability()
    return EngineResult(
        engine_path, str(trt.__version__), cc, False, f"built with TensorRT {trt.__version__} for sm {cc}"
    )


def _add_profile(builder: Any, network: Any, cfg: Any, config: TensorRTConfig) -> None:
    """One optimisation profile: the dynamic batch from min to max, other dims as exported."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise CompressError(
                f"input {tensor.name} has dynamic non-batch dims {dims}",
                hint="export with a fixed sequence/image size for a TensorRT engine",
            )

        def at(batch: int, dims: list[int] = dims) -> tuple[int, ...]:
            return (batch, *dims[1:])

        profile.set_shape(tensor.name, at(config.min_batch), at(config.opt_batch), at(config.max_batch))
    cfg.add_optimization_profile(profile)


# Where the engine lives inside the artifact bundle.
ENGINE_FILE = "engines/model.engine"


class TensorRTPass(CompressPass[TensorRTConfig]):
    """Build the chosen model's TensorRT engine here, or record that the device must build it."""

    name = "tensorrt"
    stage = "target"
    config = TensorRTConfig

    def run(self, state: ModelState, config: TensorRTConfig, ctx: PassContext) -> PassResult:
        """Build an int8 engine for an int8 model, fp16 otherwise; the engine ships beside the ONNX."""
        chosen = state.chosen
        assert chosen is not None and chosen.path is not None, "the target stage runs on the chosen model"
        ctx.progress("building the TensorRT engine")
        is_int8 = bool(chosen.config and str(chosen.config.get("mode", "")).startswith("int8"))
        engine = build_engine(chosen.path, ctx.path("model", ".engine"), config, int8=is_int8)
        if engine.path is None:
            return PassResult(state, (), {"tensorrt": engine.to_dict()})
        built = TrtEngine(
            ENGINE_FILE, ctx.profile.name, engine.tensorrt_version or "", engine.compute_capability or ""
        )
        new = replace(state, files={**state.files, ENGINE_FILE: engine.path}, engines=(*state.engines, built))
        return PassResult(new, (), {"tensorrt": engine.to_dict()})
