"""Input drift against the calibration set: the summary compress stores, the agent's live sketch, PSI.

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

``LiveSketch`` counts live requests into the same bins (a bounded sample of each request's
values, ``np.searchsorted``), over a rolling window of request buckets, and scores it with PSI,
the worst feature's. Numpy only: compress writes the summary, the agent reads it.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping
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
# Per request: at most this many rows of a [batch, F] input, or values of any other input.
SAMPLE_ROWS = 8
SAMPLE_VALUES = 64
# Requests whose inputs wait to be sampled and binned together, and the largest input kept whole
# meanwhile (bounded memory: <= 64 x 4 KiB per input; a larger one is sampled at once).
FLUSH_EVERY = 64
KEEP_BYTES = 4096
# Calibration values used to place edges (a quantile over more adds cost, not accuracy).
_MAX_CALIB_VALUES = 1 << 20
# PSI above this is a "major shift" by the usual rule of thumb (0.1 minor, 0.25 major).
DEFAULT_THRESHOLD = 0.25
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


def _lengths(arr: Array) -> Array:
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
            feats: tuple[FeatureSketch, ...] = (_sketch(_lengths(arr), bins),)
        elif nfeat > 1:
            feats = tuple(_sketch(arr[:, j], bins) for j in range(nfeat))
        else:
            feats = (_sketch(arr, bins),)
        out.append(InputSummary(name, kind, feats, int(arr.shape[0])))
    return DriftSummary(tuple(out))


def psi(expected: Array, observed_counts: Array) -> float:
    """Population stability index of observed bin counts against expected shares (both smoothed
    so an empty bin costs a bounded amount instead of infinity)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), 1e-4)
    e = e / e.sum()
    c = np.asarray(observed_counts, dtype=np.float64)
    o = (c + 0.5) / (c.sum() + 0.5 * c.size)
    return float(np.sum((o - e) * np.log(o / e)))


@dataclass(frozen=True)
class DriftScore:
    """The window's PSI (worst feature), the requests it covers and which feature was worst."""

    score: float
    requests: int
    feature: str

    def describe(self, model: str, threshold: float) -> str:
        """One line for the DRIFT event: what drifted, how far, and what to do."""
        return (
            f"model {model}: input drift PSI {self.score:.2f} on {self.feature} over the last "
            f"{self.requests} requests (threshold {threshold}); compare live inputs with the "
            "calibration set, or recompress with --calib data like today's traffic"
        )


def _held_bytes(arr: Array) -> int:
    """The bytes a reference to ``arr`` keeps alive: its whole buffer, which for a tensor decoded from
    an HTTP body (Triton's binary extension) is the body with every other input in it."""
    base: object = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, np.ndarray):
        return int(base.nbytes)
    try:
        return memoryview(base).nbytes  # type: ignore[arg-type]
    except TypeError:
        return 1 << 62  # unknown: never kept


class _Compiled:
    """One input's bins as padded arrays, ready for counting."""

    def __init__(self, summary: InputSummary) -> None:
        self.name, self.kind, self.nfeat = summary.name, summary.kind, len(summary.features)
        self.width = MAX_BINS
        edges = np.full((self.nfeat, MAX_BINS - 1), np.inf)
        self.expected: list[Array] = []
        for j, f in enumerate(summary.features):
            edges[j, : len(f.edges)] = f.edges
            self.expected.append(np.asarray(f.probs, dtype=np.float64))
        self.edges = edges
        self.flat_edges = edges[0, : len(summary.features[0].edges)].copy()
        self.offsets = np.arange(self.nfeat) * self.width

    def sample(self, arr: Array, turn: int) -> Array | None:
        """A bounded copy of what ``arr`` says about this input's features; None if it does not fit."""
        if arr.dtype.kind not in "iubf":
            return None  # nothing to bin (and a drift watch must never fail a request)
        if self.kind == "lengths":
            if arr.ndim < 2 or arr.shape[0] == 0:
                return None
            return _lengths(arr[:: max(1, arr.shape[0] // SAMPLE_ROWS)][:SAMPLE_ROWS])
        if self.nfeat > 1:
            if arr.ndim != 2 or arr.shape[1] != self.nfeat or arr.shape[0] == 0:
                return None
            return np.array(arr[:: max(1, arr.shape[0] // SAMPLE_ROWS)][:SAMPLE_ROWS])
        flat = arr.reshape(-1)
        if flat.size == 0:
            return None
        step = max(1, flat.size // SAMPLE_VALUES)
        # A start that moves with each request, so a fixed stride does not always hit the same pixels.
        return np.array(flat[(turn * 7919) % step :: step][:SAMPLE_VALUES])

    def counts(self, samples: list[Array]) -> Array:
        """Bin counts (feature * width + bin) of many requests' samples at once."""
        size = self.nfeat * self.width
        if self.nfeat > 1:
            rows = np.concatenate(samples)
            # One comparison for every column at once: bin = how many of its edges are <= the value.
            idx: Array = (rows[:, :, None] >= self.edges[None, :, :]).sum(axis=2) + self.offsets
            return np.bincount(idx.ravel(), minlength=size)
        values = np.concatenate(samples)
        return np.bincount(np.searchsorted(self.flat_edges, values, side="right"), minlength=size)


@dataclass
class _Bucket:
    started: float
    requests: int
    counts: list[Array]


class LiveSketch:
    """Rolling live-input histograms of one served model version, scored with PSI.

    The window is the last ``buckets`` buckets of ``bucket_requests`` requests each, dropping
    buckets older than ``window_s``; ``clock`` is injectable so tests can simulate a day.
    """

    def __init__(
        self,
        summary: DriftSummary,
        *,
        bucket_requests: int = 250,
        buckets: int = 4,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inputs = [_Compiled(i) for i in summary.inputs]
        self.bucket_requests, self.window_s, self._clock = bucket_requests, window_s, clock
        self._ring: collections.deque[_Bucket] = collections.deque(maxlen=buckets)
        self._lock = threading.Lock()
        self._turn = 0
        self._pending: list[list[tuple[Array, int]]] = [[] for _ in self._inputs]
        self._unbinned = 0
        self._current = self._new_bucket()
        self._alarmed = False

    def _new_bucket(self) -> _Bucket:
        return _Bucket(self._clock(), 0, [np.zeros(c.nfeat * c.width, np.int64) for c in self._inputs])

    def observe(self, feeds: Mapping[str, Array]) -> None:
        """Note one request's inputs; they are sampled and binned in batches (``FLUSH_EVERY`` requests
        at a time), so a request pays for a list append, not for numpy's per-call overhead. An input
        whose whole buffer is small is kept by reference until then (decoded request tensors are
        not written to); any other is sampled into a bounded copy at once, so held memory stays
        bounded (<= ``FLUSH_EVERY`` x ``KEEP_BYTES`` per input)."""
        self._turn += 1  # racy under threads; it only moves a sampling offset
        turn = self._turn
        with self._lock:
            for i, c in enumerate(self._inputs):
                arr = feeds.get(c.name)
                if arr is None:
                    continue
                if _held_bytes(arr) <= KEEP_BYTES:
                    self._pending[i].append((arr, turn))
                else:
                    got = c.sample(arr, turn)
                    if got is not None:
                        self._pending[i].append((got, 0))
            self._current.requests += 1
            self._unbinned += 1
            if self._current.requests >= self.bucket_requests:
                self._flush()
                self._ring.append(self._current)
                self._current = self._new_bucket()
            elif self._unbinned >= FLUSH_EVERY:
                self._flush()

    def _flush(self) -> None:
        """Sample and bin the pending inputs into the current bucket (caller holds the lock)."""
        for i, c in enumerate(self._inputs):
            if self._pending[i]:
                # turn 0 marks a sample taken at observe time; else the request's input itself.
                got = [a if turn == 0 else c.sample(a, turn) for a, turn in self._pending[i]]
                samples = [g for g in got if g is not None]
                if samples:
                    self._current.counts[i] += c.counts(samples)
                self._pending[i] = []
        self._unbinned = 0

    def score(self) -> DriftScore | None:
        """PSI over the window (the worst feature), or None before ``bucket_requests`` requests."""
        cutoff = self._clock() - self.window_s
        with self._lock:
            self._flush()
            while self._ring and self._ring[0].started < cutoff:
                self._ring.popleft()
            buckets = [*self._ring, self._current]
            total = [sum(b.counts[i] for b in buckets) for i in range(len(self._inputs))]
        requests = sum(b.requests for b in buckets)
        if requests < self.bucket_requests or not self._inputs:
            return None
        worst = DriftScore(0.0, requests, "")
        for c, counts in zip(self._inputs, total, strict=True):
            for j, expected in enumerate(c.expected):
                seen = np.asarray(counts)[j * c.width : j * c.width + expected.size]
                if seen.sum() == 0:
                    continue
                value = psi(expected, seen)
                if value > worst.score:
                    label = c.name if c.nfeat == 1 else f"{c.name}[{j}]"
                    worst = DriftScore(value, requests, label + (" length" if c.kind == "lengths" else ""))
        return worst

    def alarm(self, threshold: float = DEFAULT_THRESHOLD) -> DriftScore | None:
        """The score when it has just crossed ``threshold`` (once; re-armed below half of it)."""
        current = self.score()
        if current is None:
            return None
        if current.score >= threshold and not self._alarmed:
            self._alarmed = True
            return current
        if current.score < threshold / 2:
            self._alarmed = False
        return None
