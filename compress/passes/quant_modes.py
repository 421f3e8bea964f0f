"""What the quantize pass may try on a target: its config, the modes a profile runs, the first candidates.

``resolve_modes`` turns ``--quantize`` into the concrete modes (``auto``: every mode the profile runs,
refusing what the device cannot run with a hint); ``candidates`` is a mode's first round: the
profile's hint, the formats worth timing on the target, and ORT's defaults for reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgectl.compress.errors import BadInputError
from edgectl.compress.quantizer import (
    WEIGHT_ONLY,
    QuantConfig,
    QuantizeMode,
    QuantMode,
    latency_candidates,
    ort_default,
)
from edgectl.devices import DeviceProfile


@dataclass(frozen=True)
class QuantizeConfig:
    """The quantization search: which mode, whether to measure format candidates, calibration sample cap."""

    mode: QuantizeMode = "auto"
    search: bool = True
    calibration: Literal["auto", "minmax", "entropy", "percentile"] = "auto"
    calib_samples: int = 64


def resolve_modes(
    step: QuantizeConfig, profile: DeviceProfile, *, has_calib: bool, has_linear_weights: bool | None = None
) -> list[QuantMode]:
    """The concrete modes to try for ``step.mode`` on ``profile``; refuses modes the device cannot run,
    and a weight-only mode for a model without linear layers (``has_linear_weights`` False; None:
    the model is not read yet).

    ``auto`` is every mode the profile runs (static int8 only with calibration data): which one wins
    is measured, never guessed from which files were given.
    """
    int8_cpu = "CPUExecutionProvider" in profile.providers_for("int8")
    if step.mode == "none":
        return []
    if step.mode == "auto":
        modes: list[QuantMode] = []
        if int8_cpu:
            modes.append("int8-dynamic")
        if profile.supports("int8") and has_calib:
            modes.append("int8-static")
        if has_linear_weights and _runs_matmul_nbits(profile):
            modes += ["int8-weight", "int4-weight"]
        if profile.supports("fp16"):
            modes.append("fp16")
        return modes
    if step.mode in WEIGHT_ONLY and not _runs_matmul_nbits(profile):
        raise BadInputError(
            f"{step.mode} needs ORT's MatMulNBits kernels (CPU or CUDA EP), and {profile.name} builds TensorRT "
            "engines, whose parser does not read them",
            hint="use --quantize int8-static with --calib",
        )
    if step.mode in WEIGHT_ONLY and has_linear_weights is False:
        raise BadInputError(
            f"{step.mode} quantizes the weights of linear layers (MatMul or Gemm with a constant weight), "
            "and this model has none: it would ship the float model under that name",
            hint="use --quantize int8-static with --calib, int8-dynamic, or auto",
        )
    if step.mode in ("int8-static", "int8-dynamic") and not profile.supports("int8"):
        raise BadInputError(f"profile {profile.name} has no execution provider that runs int8")
    if step.mode == "int8-dynamic" and not int8_cpu:
        raise BadInputError(
            f"dynamic int8 needs ORT's CPU EP, but {profile.name} runs int8 only on "
            f"{', '.join(profile.providers_for('int8'))}",
            hint="use --quantize int8-static with --calib",
        )
    if step.mode == "fp16" and not profile.supports("fp16"):
        raise BadInputError(
            f"profile {profile.name} has no execution provider with fp16 kernels (ORT's CPU EP would "
            "insert casts and run slower than fp32)",
            hint="use --quantize int8-static or int8-dynamic for CPU targets",
        )
    if step.mode == "int8-static" and not has_calib:
        raise BadInputError("--quantize int8-static needs calibration data", hint="pass --calib FILE.npz")
    return [step.mode]


def _runs_matmul_nbits(profile: DeviceProfile) -> bool:
    """Whether the target runs ORT's MatMulNBits contrib op (its CPU and CUDA EPs do; TensorRT does not)."""
    eps = set(profile.execution_providers)
    return not profile.engine.tensorrt and bool(eps & {"CPUExecutionProvider", "CUDAExecutionProvider"})


def _hint(profile: DeviceProfile, mode: QuantMode) -> QuantConfig:
    q = profile.quantization
    fmt: Literal["QDQ", "QOperator"] = "QDQ" if q.format == "qdq" else "QOperator"
    if mode == "int8-dynamic":
        return QuantConfig(mode, "QOperator", "u8", q.weight_type, q.per_channel, q.reduce_range)
    return QuantConfig(mode, fmt, q.activation_type, q.weight_type, q.per_channel, q.reduce_range)


def candidates(
    step: QuantizeConfig, mode: QuantMode, profile: DeviceProfile, *, vnni: bool
) -> list[QuantConfig]:
    """The first round: the profile's hint, the measured alternatives, and ORT's defaults for reference."""
    if mode == "fp16":
        return [QuantConfig("fp16")]
    if mode in WEIGHT_ONLY:
        return [QuantConfig(mode, "QOperator")]
    first = _hint(profile, mode)
    more = latency_candidates(mode, vnni=vnni) if step.search else []
    if "CPUExecutionProvider" not in profile.providers_for("int8"):
        more = []  # TensorRT reads only symmetric s8 QDQ: CPU timings of other formats mean nothing there
    else:
        more.append(ort_default(mode))
    calib = "minmax" if step.calibration == "auto" else step.calibration
    out: list[QuantConfig] = []
    for c in [first, *more]:
        c = c.with_(calibration=calib, calib_samples=step.calib_samples)
        if c not in out:
            out.append(c)
    return out
