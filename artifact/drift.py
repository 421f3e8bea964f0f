"""Input drift, the calibration side: the summary of the calibration inputs that compress stores.

``summarize_inputs`` turns calibration arrays (sample axis first) into a ``DriftSummary``, which the
bundle carries as its own file, ``input_summary.json`` (listed in the signed manifest's ``files``
like the model, so the signature covers it; agents that predate it ignore a file they do not
use, where they refuse a manifest field they do not know). Per input
either one histogram of all its values, one per column for a ``[batch, F]`` input with F <= 16
("features"), or, for integer inputs (token ids, attention masks), the distribution of the number
of non-zero entries per sample (sequence length). Bin edges are the calibration data's own
quantiles, so each bin holds about 1/16 of it and PSI is equally sensitive everywhere. Size bound:
at most 16 bins per feature, 16 features per input and 64 inputs (<= 16,384 edges, about 200 KB
of JSON at worst; a 4-feature input is ~1 KB).

Numpy only: compress writes the summary, the agent reads it (``live_sketch`` counts live
requests into the same bins).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgectl.artifact.canonical import canonical_bytes
from edgectl.artifact.errors import ManifestError

SUMMARY_FORMAT = "edgectl.input-summary/v1"
SUMMARY_FILE = "input_summary.json"
MAX_BINS = 16
MAX_FEATURES = 16
MAX_INPUTS = 64
# Calibration values used to place edges (a quantile over more adds cost, not accuracy).
_MAX_CALIB_VALUES = 1 << 20
Kind = Literal["values", "lengths"]
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class FeatureSketch:
    """One histogram: ascending inner bin edges and the calibration share of each bin."""

    edges: tuple[float, ...]
    probs: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "probs": list(self.probs)}

    @classmethod
    def from_dict(cls, obj: object, where: str) -> FeatureSketch:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where} must be a JSON object")
        edges, probs = obj.get("edges"), obj.get("probs")
        if not isinstance(edges, list) or not isinstance(probs, list):
            raise ManifestError(f"{where}: edges and probs must be lists")
        nums = (*edges, *probs)
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in nums):
            raise ManifestError(f"{where}: edges and probs must be numbers")
        if len(probs) != len(edges) + 1 or len(probs) > MAX_BINS:
            raise ManifestError(f"{where}: needs len(probs) == len(edges) + 1 <= {MAX_BINS}")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ManifestError(f"{where}: edges must be strictly ascending")
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-3:
            raise ManifestError(f"{where}: probs must be shares that sum to 1")
        return cls(tuple(float(x) for x in edges), tuple(float(x) for x in probs))


@dataclass(frozen=True)
class InputSummary:
    """The calibration distribution of one model input (``features``: 1 pooled, or one per column)."""

    name: str
    kind: Kind
    features: tuple[FeatureSketch, ...]
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, obj: object) -> InputSummary:
        if not isinstance(obj, dict):
            raise ManifestError("input_summary.inputs[] must hold JSON objects")
        name, kind, count, feats = obj.get("name"), obj.get("kind"), obj.get("count"), obj.get("features")
        where = f"input_summary[{name}]"
        if not isinstance(name, str) or kind not in ("values", "lengths"):
            raise ManifestError(f"{where}: needs a string name and kind 'values' or 'lengths'")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ManifestError(f"{where}: count must be a positive integer")
        if not isinstance(feats, list) or not 1 <= len(feats) <= MAX_FEATURES:
            raise ManifestError(f"{where}: features must be a list of 1 to {MAX_FEATURES} histograms")
        sketches = tuple(FeatureSketch.from_dict(f, f"{where}.features[{i}]") for i, f in enumerate(feats))
        return cls(name, kind, sketches, count)


@dataclass(frozen=True)
class DriftSummary:
    """What the calibration inputs looked like; stored in the bundle as ``SUMMARY_FILE``."""

    inputs: tuple[InputSummary, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"format": SUMMARY_FORMAT, "inputs": [i.to_dict() for i in self.inputs]}

    @classmethod
    def from_dict(cls, obj: object) -> DriftSummary:
        """Parse and check the bounds; ManifestError names the bad field."""
        if not isinstance(obj, dict) or obj.get("format") != SUMMARY_FORMAT:
            raise ManifestError(f"input_summary must be an object with format {SUMMARY_FORMAT!r}")
        inputs = obj.get("inputs")
        if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS:
            raise ManifestError(f"input_summary.inputs must be a list of at most {MAX_INPUTS} inputs")
        return cls(tuple(InputSummary.from_dict(i) for i in inputs))

    def to_bytes(self) -> bytes:
        """The canonical JSON written as ``SUMMARY_FILE``."""
        return canonical_bytes(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> DriftSummary | None:
        """Parse ``SUMMARY_FILE``; None for a summary format of a newer edgectl (no drift watch here,
        the model still serves); ManifestError for a malformed one."""
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ManifestError(f"{SUMMARY_FILE} is not JSON: {exc}") from exc
        if isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"] != SUMMARY_FORMAT:
            return None
        return cls.from_dict(obj)


def _round(x: float) -> float:
    # Six significant digits keep the manifest small; probs are computed after rounding, so they agree.
    return float(f"{x:.6g}")


def _sketch(values: Array, bins: int) -> FeatureSketch:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size > _MAX_CALIB_VALUES:
        v = v[:: v.size // _MAX_CALIB_VALUES + 1]
    if v.size == 0:
        return FeatureSketch((), (1.0,))
    cuts = np.quantile(v, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = tuple(sorted({_round(float(c)) for c in cuts}))
    counts = np.bincount(np.searchsorted(np.asarray(edges), v, side="right"), minlength=len(edges) + 1)
    probs = [round(float(c) / v.size, 6) for c in counts]
    probs[int(np.argmax(counts))] += round(1.0 - sum(probs), 6)  # exact sum despite rounding
    return FeatureSketch(edges, tuple(probs))


def lengths(arr: Array) -> Array:
    """Non-zero entries per sample: the token count of padded ids or an attention mask."""
    return np.asarray(np.count_nonzero(arr.reshape(arr.shape[0], -1), axis=1))


def _plan(arr: Array) -> tuple[Kind, int] | None:
    """How an input is summarised: (kind, features), or None for what has no order (strings)."""
    if arr.dtype.kind in "iub" and arr.ndim >= 2:
        return "lengths", 1
    if arr.dtype.kind not in "iubf":
        return None
    if arr.ndim == 2 and 1 <= arr.shape[1] <= MAX_FEATURES:
        return "values", int(arr.shape[1])
    return "values", 1


def summarize_inputs(inputs: Mapping[str, Array], bins: int = MAX_BINS) -> DriftSummary:
    """Summarise calibration inputs (name -> array, sample axis first) into at most ``bins`` per feature."""
    if not 2 <= bins <= MAX_BINS:
        raise ManifestError(f"bins must be between 2 and {MAX_BINS}, got {bins}")
    out: list[InputSummary] = []
    for name in sorted(inputs)[:MAX_INPUTS]:
        arr = np.asarray(inputs[name])
        plan = _plan(arr) if arr.ndim >= 1 and arr.shape[0] > 0 else None
        if plan is None:
            continue
        kind, nfeat = plan
        if kind == "lengths":
            feats: tuple[FeatureSketch, ...] = (_sketch(lengths(arr), bins),)
        elif nfeat > 1:
            feats = tuple(_sketch(arr[:, j], bins) for j in range(nfeat))
        else:
            feats = (_sketch(arr, bins),)
        out.append(InputSummary(name, kind, feats, int(arr.shape[0])))
    return DriftSummary(tuple(out))
