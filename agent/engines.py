"""TensorRT engines: use the artifact's prebuilt engine when it fits this GPU, else build and cache.

A prebuilt engine ships in the artifact as an onnxruntime EP-context model (what onnxruntime's
``trt_dump_ep_context_model`` writes: a small ONNX file whose EPContext node points at the
serialized engine). It is used only when the device profile's engine rules say the engine's
TensorRT version and compute capability match this host, and TensorRT itself deserializes it.
Otherwise onnxruntime's TensorRT EP builds the engine on first load and keeps it in the
agent's engine cache, so a restart does not rebuild it. Where TensorRT is absent, all of this
is skipped with the reason (the EP chain then starts at CUDA or CPU).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from edgectl.artifact import VerifiedArtifact
from edgectl.devices import DeviceProfile, EngineTarget, HostFacts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    """The engine decision for one model: a prebuilt EP-context model to load, or None, and why."""

    prebuilt: Path | None
    reason: str


def host_target(facts: HostFacts) -> EngineTarget | None:
    """This host's TensorRT version, GPU compute capability and board, or None without TensorRT/GPU."""
    if not facts.tensorrt_version or not facts.cuda_devices:
        return None
    gpu = facts.cuda_devices[0]
    return EngineTarget(facts.tensorrt_version, gpu.compute_capability, facts.device_model or gpu.name)


def deserializes(engine_path: Path) -> tuple[bool, str]:
    """Whether TensorRT on this host can deserialize ``engine_path`` (the final word on fit)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return False, f"tensorrt is not installed ({exc})"
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        return False, f"TensorRT {trt.__version__} cannot deserialize {engine_path.name} on this GPU"
    return True, f"TensorRT {trt.__version__} deserialized {engine_path.name}"


def choose_engine(
    artifact: VerifiedArtifact, profile: DeviceProfile, facts: HostFacts | None
) -> EngineChoice:
    """Pick the artifact's engine for this host, or explain why the engine is built on the device."""
    if not profile.engine.tensorrt:
        return EngineChoice(None, f"profile {profile.name} does not use TensorRT")
    host = host_target(facts) if facts is not None else None
    if host is None:
        why = (facts.tensorrt_absent_reason or facts.cuda_absent_reason) if facts else "no host facts"
        return EngineChoice(None, f"TensorRT unavailable here: {why or 'no TensorRT or no GPU'}")
    for engine in artifact.manifest.trt_engines:
        built = EngineTarget(engine.trt_version, engine.compute_capability, engine.device_class)
        ok, why = profile.engine.compatible(built, host)
        if not ok:
            log.info("engine %s skipped: %s", engine.file, why)
            continue
        if not engine.file.endswith(".onnx"):
            log.info("engine %s skipped: not an onnxruntime EP-context model", engine.file)
            continue
        return EngineChoice(artifact.path(engine.file), why)
    return EngineChoice(None, "no prebuilt engine fits this host; onnxruntime builds one and caches it")
