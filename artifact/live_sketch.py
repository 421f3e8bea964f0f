"""Input drift, the device side: live requests counted into the calibration summary's bins, and PSI.

``LiveSketch`` counts each served model version's live requests into the bins of its artifact's
``DriftSummary`` (a bounded sample of each request's values, ``np.searchsorted``), over a rolling
window of request buckets, and scores it with PSI, the worst feature's.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgectl.artifact.drift import MAX_BINS, Array, DriftSummary, InputSummary, lengths

# Per request: at most this many rows of a [batch, F] input, or values of any other input.
SAMPLE_ROWS = 8
SAMPLE_VALUES = 64
# Requests whose inputs wait to be sampled and binned together, and the largest input kept whole
# meanwhile (bounded memory: <= 64 x 4 KiB per input; a larger one is sampled at once).
FLUSH_EVERY = 64
KEEP_BYTES = 4096
# PSI above this is a "major shift" by the usual rule of thumb (0.1 minor, 0.25 major).
DEFAULT_THRESHOLD = 0.25


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
            return lengths(arr[:: max(1, arr.shape[0] // SAMPLE_ROWS)][:SAMPLE_ROWS])
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
