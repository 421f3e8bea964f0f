"""Build one quantized model with ONNX Runtime's quantizer: dynamic INT8, static INT8 (QDQ or QOperator), FP16.

Formats and types are *candidates*, not defaults: ``latency_candidates`` lists the ones worth
timing on the target's execution provider and ``quality_variants`` the calibration choices worth
scoring; the pipeline measures them and keeps the fastest that meets the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError
from edgectl.compress.graph import probe_session
from edgectl.compress.passes.gemm import MATMUL_MODES, write_gemms_as_matmul
from edgectl.compress.passes.smooth import smoothed
from edgectl.compress.passes.stem import float_stem_nodes, pad_stem_channels, quantize_before_pad, stem_convs
from edgectl.compress.perchannel import vectorized_per_channel
from edgectl.devices import VNNI_FEATURES, cpu_flags

# The concrete modes one model is quantized in, and what a recipe or --quantize may ask for.
QuantMode = Literal["int8-static", "int8-dynamic", "int8-weight", "int4-weight", "fp16"]
QuantizeMode = Literal["auto", "int8-static", "int8-dynamic", "int8-weight", "int4-weight", "fp16", "none"]
# Weight-only modes: MatMul (and linear Gemm) weights in blocks of int8/int4 (ORT's MatMulNBits), activations float.
WEIGHT_ONLY: dict[str, int] = {"int8-weight": 8, "int4-weight": 4}
# The block of weights that shares one scale in the weight-only modes.
WEIGHT_BLOCK = 32
QUANTIZE_MODES: tuple[str, ...] = typing.get_args(QuantizeMode)
Calibration = Literal["minmax", "entropy", "percentile"]
# How static int8 treats an image CNN's stem conv (``passes/stem.py``): as it is, its input padded
# to 4 channels, or kept float.
Stem = Literal["int8", "pad", "float"]


@dataclass(frozen=True)
class QuantConfig:
    """One way to quantize: mode, format, activation/weight types, granularity and calibration."""

    mode: QuantMode = "int8-static"
    fmt: Literal["QDQ", "QOperator"] = "QDQ"
    activations: Literal["u8", "s8"] = "u8"
    weights: Literal["s8", "u8"] = "s8"
    per_channel: bool = True
    reduce_range: bool = False
    calibration: Calibration = "minmax"
    calib_samples: int = 64
    smooth_alpha: float = 0.0  # SmoothQuant migration strength; 0 = off
    exclude: tuple[str, ...] = ()
    # Nodes that must stay float whatever the search does (masks, ±inf): see ``float_by_rule``.
    keep_float: tuple[str, ...] = ()
    stem: Stem = "int8"
    # Dynamic and weight-only modes: linear-layer Gemms rewritten as MatMul first (``passes/gemm.py``).
    gemm_as_matmul: bool = True

    def label(self) -> str:
        """Short human name for tables, e.g. ``int8-static QDQ U8S8 pc minmax``."""
        if self.mode == "fp16":
            text = "fp16"
        elif self.mode in WEIGHT_ONLY:
            text = f"{self.mode} MatMulNBits block {WEIGHT_BLOCK}"
        else:
            types = f"{self.activations}{self.weights}".upper()
            text = f"{self.mode} {self.fmt} {types}{' pc' if self.per_channel else ''}"
            text += " rr" if self.reduce_range else ""
            text += f" {self.calibration}" if self.mode == "int8-static" else ""
            text += f" smooth{self.smooth_alpha:g}" if self.smooth_alpha else ""
            text += {"int8": "", "pad": " stem-pad4", "float": " float-stem"}[self.stem]
        text += " gemm kept" if self.mode in MATMUL_MODES and not self.gemm_as_matmul else ""
        return text + (f" +{len(self.exclude)} float" if self.exclude else "")

    def to_dict(self) -> dict[str, object]:
        """For the manifest's recipe record."""
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        out["keep_float"] = list(self.keep_float)
        return out

    def with_(self, **changes: object) -> QuantConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds calibration samples to ORT one small batch at a time."""

    def __init__(self, data: SampleSet, batch: int = 8) -> None:
        self._data = data
        self._batch = batch
        self._it: Iterator[dict[str, np.ndarray]] = data.batches(batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._data.batches(self._batch)


def quantize(
    src: Path, dst: Path, config: QuantConfig, calib: SampleSet | None = None, *, cache: Path | None = None
) -> None:
    """Write ``src`` quantized per ``config`` to ``dst``.

    ``cache``: a folder where static calibration ranges are kept and reused by later candidates that
    calibrate the same tensors the same way (ORT >= the version with ``calibration_cache_path``).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    # ORT logs a warning per tensor it leaves in float; the trial table says what happened.
    logging.getLogger().setLevel(logging.ERROR)
    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    if config.mode in MATMUL_MODES and config.gemm_as_matmul:
        src = _gemms_as_matmul(src, dst.parent / f"{src.stem}.linear.onnx")
    if config.smooth_alpha and config.mode != "fp16":
        if calib is None:
            raise BadInputError("SmoothQuant needs calibration data", hint="pass --calib FILE.npz")
        src = smoothed(src, dst, calib, config.smooth_alpha, cache)
    if config.mode == "int8-static" and config.fmt == "QDQ":
        # One converted copy per source, beside the candidates: they share its calibration cache.
        src = _qdq_opset(src, dst.parent / f"{src.stem}.opset13.onnx")
    exclude = list(config.exclude) + list(config.keep_float)
    if config.stem == "pad":
        padded = dst.with_name(dst.stem + ".stem.onnx")
        pad_stem_channels(src, padded)
        src = padded
    elif config.stem == "float":
        exclude += float_stem_nodes(onnx.load(str(src), load_external_data=False))
    if config.mode == "fp16":
        _fp16(src, dst, exclude)
    elif config.mode in WEIGHT_ONLY:
        _weight_only(src, dst, WEIGHT_ONLY[config.mode], exclude)
    elif config.mode == "int8-dynamic":
        with vectorized_per_channel():
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                weight_type=qtype[config.weights],
                nodes_to_exclude=exclude,
                # Fused contrib ops (SkipLayerNormalization, ...) have no ONNX type inference.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    else:
        if calib is None:
            raise BadInputError("static INT8 needs calibration data", hint="pass --calib FILE.npz")
        reader = _Reader(calib.take(config.calib_samples))
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[config.calibration]
        op_types = _calibrated_op_types(src, config) if config.keep_float else None
        reuse = _calibration_cache(cache, src, config, quantize_static)
        # ORT's histogram calibrators print progress to stdout, which --json output must not carry.
        with contextlib.redirect_stdout(io.StringIO()), vectorized_per_channel():
            quantize_static(
                str(src),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ if config.fmt == "QDQ" else QuantFormat.QOperator,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=qtype[config.activations],
                weight_type=qtype[config.weights],
                nodes_to_exclude=exclude,
                op_types_to_quantize=op_types,
                calibrate_method=method,
                extra_options={"CalibPercentile": 99.99, "DefaultTensorType": onnx.TensorProto.FLOAT},
                **reuse,
            )
        if config.stem == "pad":
            quantize_before_pad(dst)  # pad the u8 image, not the float one


# QDQ with per-channel scales (a DequantizeLinear ``axis``) needs opset 13.
_QDQ_OPSET = 13


def _gemms_as_matmul(src: Path, dst: Path) -> Path:
    """``src`` with its linear-layer Gemms as MatMul, written once beside the candidates; ``src`` when it has none."""
    if dst.exists() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
        return dst
    return dst if write_gemms_as_matmul(src, dst) else src


def _qdq_opset(src: Path, dst: Path) -> Path:
    """``src`` converted to opset 13 when it is older (an opset 10/11 export), else ``src`` itself.

    ORT's quantizer writes opset-13 QDQ nodes into the graph as it is: an opset 11 model came out
    invalid, so every QDQ candidate failed (on TensorRT profiles, every int8 candidate).
    """
    from onnx import version_converter

    if dst.exists():
        return dst
    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), _QDQ_OPSET)
    if opset >= _QDQ_OPSET:
        return src
    try:
        converted = version_converter.convert_version(model, _QDQ_OPSET)
    except Exception:  # an op the converter cannot move: the candidate fails as it would have
        return src
    onnx.save(converted, str(dst))
    return dst


def _calibration_cache(
    cache: Path | None, src: Path, config: QuantConfig, quantize_static: object
) -> dict[str, str]:
    """``calibration_cache_path`` for ``quantize_static`` when it has one: one file per way of calibrating.

    Ranges depend on the model, the method, the samples, the tensors calibrated (the format's op
    types, the nodes kept float) and smoothing; not on the integer types, granularity or range
    reduction, so the format candidates of one search share one calibration run.
    """
    import inspect

    if cache is None or "calibration_cache_path" not in inspect.signature(quantize_static).parameters:  # type: ignore[arg-type]
        return {}
    key = repr((str(src.resolve()), config.fmt, config.calibration, config.calib_samples, config.smooth_alpha,
                sorted(config.keep_float)))  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    return {"calibration_cache_path": str(cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json")}


# Beyond this magnitude a value is a mask or a sentinel (torch's finfo.min), not an activation.
_HUGE = 1e6


def float_by_rule(model_path: Path, calib: SampleSet, *, batch: int = 2) -> dict[str, str]:
    """Nodes that static int8 must leave in float, each with the reason.

    A node reading or writing a tensor that holds ±inf, NaN or sentinel magnitudes (an additive
    attention mask) cannot get an int8 range: one such value turns the scale into inf and every
    other value into zero. The check runs the float model on the calibration samples.
    """
    model = onnx.load(str(model_path))
    inits = {i.name for i in model.graph.initializer}
    tensors = sorted({o for n in model.graph.node for o in n.output if o} - inits)
    session, names = probe_session(model, tensors)
    bad: dict[str, str] = {}
    for feed in calib.take(32).batches(batch):
        for name, value in zip(names, session.run(None, feed), strict=True):
            arr = np.asarray(value)
            if name in bad or arr.dtype.kind != "f" or arr.size == 0:
                continue
            finite = np.isfinite(arr)
            if not finite.all():
                bad[name] = "holds ±inf/NaN"
            elif float(np.abs(arr).max()) > _HUGE:
                bad[name] = f"holds values of {float(np.abs(arr).max()):.3g} (a mask or sentinel)"
    for graph_input in model.graph.input:  # an input can be the additive mask itself
        value = calib.inputs.get(graph_input.name)
        if value is not None and value.dtype.kind == "f" and not np.isfinite(value).all():
            bad[graph_input.name] = "holds ±inf/NaN"
    out: dict[str, str] = {}
    for node in model.graph.node:
        hit = next((t for t in [*node.input, *node.output] if t in bad), None)
        if hit is not None and node.name:
            out[node.name] = f"{node.op_type} touches {hit!r}, which {bad[hit]}: int8 has no range for it"
    return out


def _calibrated_op_types(src: Path, config: QuantConfig) -> list[str]:
    """Op types to quantize when some nodes stay float by rule: none of theirs.

    ORT's calibrators pick tensors by op type, not by node, and the histogram ones fail on an
    infinite value; leaving those op types out keeps the offending tensors out of calibration.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.load(str(src), load_external_data=False)
    kept = set(config.keep_float)
    avoid = {n.op_type for n in model.graph.node if n.name in kept}
    registry = QDQRegistry if config.fmt == "QDQ" else QLinearOpsRegistry
    return sorted(set(registry) - avoid)


def _weight_only(src: Path, dst: Path, bits: int, exclude: list[str]) -> None:
    """MatMul weights with a constant B as blocked int``bits`` (MatMulNBits), activations float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    # accuracy_level 4: the CPU kernel quantizes activations to int8 on the fly (VNNI where present).
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=WEIGHT_BLOCK, is_symmetric=True, accuracy_level=4,
        nodes_to_exclude=exclude,
    )  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _fp16(src: Path, dst: Path, exclude: list[str]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # keep_io_types: callers keep feeding float32, the agent's V2 server needs no cast.
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude or None)
    onnx.save(half, str(dst))


def cpu_has_vnni() -> bool:
    """True when this x86 CPU has the VNNI int8 dot-product instructions."""
    return bool(VNNI_FEATURES & cpu_flags())


def latency_candidates(mode: QuantMode, *, vnni: bool) -> list[QuantConfig]:
    """Format/type choices whose speed differs by execution provider and CPU: time them all."""
    # Without VNNI, u8*s8 products can saturate 16-bit accumulators: 7-bit weights avoid it.
    rr = not vnni
    if mode == "int8-dynamic":
        out = [
            QuantConfig("int8-dynamic", "QOperator", "u8", "s8", per_channel=True, reduce_range=rr),
            QuantConfig("int8-dynamic", "QOperator", "u8", "s8", per_channel=False, reduce_range=rr),
        ]
        if not vnni:
            # VNNI's dot product (vpdpbusd) takes u8 x s8: U8U8 leaves that fast path and is not worth
            # building and scoring there. Without VNNI it avoids the 16-bit saturation and can win.
            out.append(
                QuantConfig("int8-dynamic", "QOperator", "u8", "u8", per_channel=False, reduce_range=rr)
            )
        return out
    if mode == "int8-static":
        return [
            QuantConfig("int8-static", "QDQ", "u8", "s8", reduce_range=rr),
            QuantConfig("int8-static", "QDQ", "s8", "s8", reduce_range=rr),
            QuantConfig("int8-static", "QOperator", "u8", "s8", reduce_range=rr),
        ]
    return [QuantConfig(mode, "QOperator")]


def stem_variants(model_path: Path, configs: Sequence[QuantConfig]) -> list[QuantConfig]:
    """The image stem padded to 4 channels, and kept float, on one of ``configs``: more candidates to time.

    Only for models with a stem (a conv reading a <= 4-channel image) and a static U8 candidate (what
    MLAS's NHWC int8 conv runs), preferably QOperator U8S8 per-channel; which is fastest is measured.
    """
    static = [c for c in configs if c.mode == "int8-static" and c.activations == "u8" and c.stem == "int8"]
    if not static:
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    stems = stem_convs(model)
    if not stems:
        return []
    base = next(
        (c for c in static if c.fmt == "QOperator" and c.weights == "s8" and c.per_channel), static[0]
    )
    weights = {i.name: i for i in model.graph.initializer}
    out = [base.with_(stem="float")]
    if any(weights[n.input[1]].dims[1] % 4 for n in stems):
        out.insert(0, base.with_(stem="pad"))
    return out


def quality_variants(base: QuantConfig, *, has_matmul: bool = False) -> list[QuantConfig]:
    """Choices that mostly move quality, to try when the budget is missed: calibration, SmoothQuant, granularity."""
    out: list[QuantConfig] = []
    if base.mode in WEIGHT_ONLY:
        return out  # one block size, symmetric: nothing cheap to turn
    if base.mode == "int8-static":
        out += [base.with_(calibration=c) for c in ("percentile", "entropy") if c != base.calibration]
    if base.mode != "fp16" and has_matmul:
        # Transformer activations have outlier channels: migrate them into the weights.
        out += [base.with_(per_channel=True, smooth_alpha=a) for a in (0.7, 0.5) if a != base.smooth_alpha]
    if base.mode != "fp16":
        out.append(base.with_(per_channel=not base.per_channel))
        out.append(base.with_(reduce_range=not base.reduce_range))
    return out


def ort_default(mode: QuantMode) -> QuantConfig:
    """What plain ``quantize_static`` / ``quantize_dynamic`` do with no options (the baseline users get)."""
    if mode == "int8-dynamic":
        return QuantConfig("int8-dynamic", "QOperator", "u8", "s8", per_channel=False)
    return QuantConfig("int8-static", "QDQ", "s8", "s8", per_channel=False)
