"""onnxruntime sessions for served models: the device profile's EP order with logged fallback.

Each execution provider of the profile (TensorRT -> CUDA -> CPU) is tried in turn; one that is
not built into this onnxruntime, or that fails to create a session, is skipped with its reason,
which the reported state and the logs carry. CPU always closes the chain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgectl.agent.codecs import Array
from edgectl.agent.errors import InferenceError, InvalidInputError, ModelLoadError
from edgectl.artifact import DriftSummary, TensorSpec, UnsupportedTensorTypeError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


@dataclass(frozen=True)
class SessionSettings:
    """How sessions are made: threads, EP order, and where TensorRT keeps built engines."""

    providers: tuple[str, ...] = (CPU,)
    intra_op_threads: int = 0  # 0: onnxruntime's default (all cores)
    inter_op_threads: int = 1
    engine_cache_dir: Path | None = None
    # A prebuilt engine (EP context model) from the artifact that fits this GPU, if any.
    prebuilt_engine: Path | None = None


@dataclass
class LoadedModel:
    """A ready onnxruntime session with its signature and the provider that actually serves it."""

    name: str
    version: int
    digest: str
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str
    fallback_reasons: tuple[str, ...] = ()
    # The artifact's calibration-input summary (drift reference); None for artifacts without one.
    input_summary: DriftSummary | None = None

    @property
    def batchable(self) -> bool:
        """True when every input and output has a free first dimension (a batch dimension)."""
        tensors = (*self.inputs, *self.outputs)
        return bool(tensors) and all(t.batched for t in tensors)

    def validate(self, feeds: Mapping[str, Array]) -> None:
        """Raise InvalidInputError unless names, dtypes and shapes match the signature."""
        expected = {t.name for t in self.inputs}
        if set(feeds) != expected:
            raise InvalidInputError(
                f"model {self.name!r} takes inputs {sorted(expected)}, got {sorted(feeds)}"
            )
        for spec in self.inputs:
            arr = feeds[spec.name]
            if np.dtype(arr.dtype) != np.dtype(spec.dtype):
                raise InvalidInputError(
                    f"input {spec.name!r} of model {self.name!r} must be {spec.dtype}, got {arr.dtype}"
                )
            if not spec.accepts(arr.shape):
                raise InvalidInputError(
                    f"input {spec.name!r} of model {self.name!r} must have shape "
                    f"{spec.wire_shape()}, got {list(arr.shape)}"
                )

    def __post_init__(self) -> None:
        # Worked out once: the request path names the outputs and knows whether any input is text.
        self._output_names = [t.name for t in self.outputs]
        self._has_text = any(np.dtype(t.dtype) == np.object_ for t in self.inputs)

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Run the session; onnxruntime's run is thread-safe, errors become InferenceError."""
        if self._has_text:
            feeds = {n: _as_text(n, a) if a.dtype == np.object_ else a for n, a in feeds.items()}
        try:
            values = self._run_session(feeds if isinstance(feeds, dict) else dict(feeds))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument classes
            raise InferenceError(f"model {self.name!r} failed: {exc}") from exc
        # A tensor output is a numpy array already (the signature admits nothing else).
        return dict(zip(self._output_names, values, strict=True))

    def _run_session(self, feeds: dict[str, Array]) -> list[Any]:
        # InferenceSession.run re-checks on every call what the request path has made sure of
        # already (every input given, no OrtValue from elsewhere, no WebGPU graph capture); on a
        # tiny model those checks are a few percent of a lone caller's round trip
        # (benchmarks/bench_serving.py). The bound C++ session it wraps skips them. Read it on
        # every call: a provider fallback replaces it. When it fails, the public run() repeats
        # the call, so its retry on the next execution provider still applies.
        bound = getattr(self.session, "_sess", None)
        values: list[Any]
        if bound is not None:
            try:
                values = bound.run(self._output_names, feeds, None)
                return values
            except Exception:
                pass  # repeated below through the public API
        values = self.session.run(self._output_names, feeds)
        return values


def _as_text(name: str, array: Array) -> Array:
    """onnxruntime string tensors hold UTF-8 text (it would str() a bytes object): decode BYTES."""
    try:
        items = [v.decode() if isinstance(v, bytes) else v for v in array.ravel()]
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"input {name!r}: this model's strings must be UTF-8 ({exc})") from None
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(array.shape)


def _signature(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    try:
        return tuple(TensorSpec.from_node_arg(a) for a in args)
    except UnsupportedTensorTypeError as exc:
        raise ModelLoadError(str(exc)) from exc


def _provider_options(provider: str, settings: SessionSettings) -> dict[str, str]:
    if provider != TENSORRT:
        return {}
    opts: dict[str, str] = {}
    if settings.engine_cache_dir is not None:
        settings.engine_cache_dir.mkdir(parents=True, exist_ok=True)
        # onnxruntime builds the engine on first load and reuses it from here after a restart.
        opts |= {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(settings.engine_cache_dir),
            "trt_timing_cache_enable": "True",
        }
    return opts


def provider_chain(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """(providers to try in order, reasons for the ones skipped); CPU always ends the chain."""
    available = set(ort.get_available_providers())
    chain: list[str] = []
    skipped: list[str] = []
    for ep in wanted:
        if ep in available:
            chain.append(ep)
        else:
            skipped.append(f"{ep}: not built into this onnxruntime ({ort.__version__})")
    if CPU not in chain:
        chain.append(CPU)
    return chain, skipped


def load_model(path: Path, *, name: str, version: int, digest: str, settings: SessionSettings) -> LoadedModel:
    """Create a session on the first provider of the chain that works; ModelLoadError if none does."""
    chain, reasons = provider_chain(settings.providers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    model_path = path
    for ep in chain:
        if ep == TENSORRT and settings.prebuilt_engine is not None:
            model_path = settings.prebuilt_engine  # an EP-context model that wraps the engine
        try:
            providers: list[Any] = [(ep, _provider_options(ep, settings))]
            if ep != CPU:
                providers.append(CPU)  # nodes the accelerator cannot take still run
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # any EP init failure is a reason to fall back, never a crash
            reasons.append(f"{ep}: session creation failed: {exc}")
            model_path = path
            continue
        active = session.get_providers()[0]
        if active != ep:
            reasons.append(f"{ep}: onnxruntime fell back to {active}")
        for why in reasons:
            log.warning("model %s: %s", name, why)
        return LoadedModel(
            name=name,
            version=version,
            digest=digest,
            session=session,
            inputs=_signature(session.get_inputs()),
            outputs=_signature(session.get_outputs()),
            provider=active,
            fallback_reasons=tuple(reasons),
        )
    raise ModelLoadError(f"model {name!r} could not be loaded on any provider: {'; '.join(reasons)}")
