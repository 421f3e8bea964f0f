"""Background runs beside serving: another version run on a request's input after it was answered.

A trial (``canary``) hands each answered request to the ``ShadowWorker``: in shadow mode the
candidate runs on it, in canary mode the current version re-runs a candidate's input, so the two
versions' outputs can be compared (``compare``: top-1 agreement for classifier outputs
``[batch, classes]``, mean cosine otherwise). Serving comes first: one worker thread at the lowest
CPU priority, a bounded queue, and a CPU budget (a token bucket worth ``cpu_share`` of one core).
A run is skipped, and counted, when the queue is full, the budget spent, or either version had
a request in its queue or in flight when the run would start; the answer a caller gets never waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgectl.agent.codecs import Array
from edgectl.agent.errors import AgentError
from edgectl.agent.serving import ModelRegistry

log = logging.getLogger(__name__)

KIND_TOP1 = "top1"
KIND_COSINE = "cosine"
BACKGROUND_NICE = 19


@dataclass(frozen=True)
class ShadowJob:
    """One background run: ``feeds`` on ``version`` of ``name``, reported to ``finish`` (outputs,
    or None when the run failed, and its seconds) or to ``skip``; ``watch``: the versions whose
    requests come first; ``wanted``: False once the trial that asked for it is over."""

    name: str
    version: str
    watch: tuple[str, ...]
    feeds: Mapping[str, Array]
    finish: Callable[[dict[str, Array] | None, float], None]
    skip: Callable[[], None]
    wanted: Callable[[], bool]


def compare(current: Mapping[str, Array], candidate: Mapping[str, Array]) -> tuple[str, int, float]:
    """(kind, rows compared, rows agreeing or summed cosine) over the outputs both have."""
    names = sorted(set(current) & set(candidate))
    pairs = [(np.asarray(current[n]), np.asarray(candidate[n])) for n in names]
    pairs = [(a, b) for a, b in pairs if a.shape == b.shape and a.dtype.kind == "f" and a.size]
    if not pairs:
        return KIND_COSINE, 0, 0.0
    if all(a.ndim == 2 and a.shape[1] > 1 for a, _ in pairs):
        a, b = pairs[0]
        return KIND_TOP1, a.shape[0], float(np.count_nonzero(a.argmax(1) == b.argmax(1)))
    rows = pairs[0][0].shape[0] if pairs[0][0].ndim else 1
    same = [(a, b) for a, b in pairs if (a.shape[0] if a.ndim else 1) == rows]
    x: np.ndarray = np.concatenate([a.reshape(rows, -1) for a, _ in same], axis=1).astype(np.float64)
    y: np.ndarray = np.concatenate([b.reshape(rows, -1) for _, b in same], axis=1).astype(np.float64)
    dots: np.ndarray = np.einsum("ij,ij->i", x, y)
    norms: np.ndarray = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    # Two all-zero rows agree exactly; one zero row against a non-zero one does not.
    equal: np.ndarray = np.all(x == y, axis=1).astype(np.float64)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), equal)
    return KIND_COSINE, rows, float(np.sum(cos))


class ShadowWorker:
    """One low-priority thread that runs ``ShadowJob``s while serving leaves room, under a CPU budget."""

    def __init__(
        self, registry: ModelRegistry, *, queue_size: int, cpu_share: float, timeout_s: float
    ) -> None:
        self.registry = registry
        self.cpu_share, self.timeout_s = cpu_share, timeout_s
        self._queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=max(1, queue_size))
        self._tokens = cpu_share
        self._refilled = time.monotonic()
        self._lock = threading.Lock()
        self._budget_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="canary-shadow", daemon=True)
                self._thread.start()

    def offer(self, job: ShadowJob) -> None:
        """Queue ``job``, or count it skipped; never blocks. Under load the skip is decided here, on
        the request's thread, from two cheap looks (queues, budget): a busy box does not even wake
        the worker, whose every wake-up would take the GIL from the threads serving requests."""
        if self._busy(job) or not self._budget():
            job.skip()
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            job.skip()

    def _budget(self) -> bool:
        with self._budget_lock:
            now = time.monotonic()
            self._tokens = min(self.cpu_share, self._tokens + (now - self._refilled) * self.cpu_share)
            self._refilled = now
            return self._tokens > 0

    def _spend(self, seconds: float) -> None:
        with self._budget_lock:
            self._tokens -= seconds

    def _busy(self, job: ShadowJob) -> bool:
        """A request of a watched version is queued or running (a cheap look, no lock)."""
        for version in job.watch:
            served = self.registry.resolve(job.name, version)
            if served is None or not served.batcher.idle:
                return True
        return False

    def _run(self) -> None:
        # Linux schedules threads on their own nice value: background runs (ORT runs in the calling
        # thread when the version is idle) yield the CPU to the threads that answer requests.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._background(job)
            except Exception:  # a comparison must never take the worker down
                log.exception("background run for %s failed", job.name if job else "?")
            finally:
                self._queue.task_done()

    def _background(self, job: ShadowJob) -> None:
        if self._busy(job) or not self._budget() or not job.wanted():
            job.skip()
            return
        start = time.perf_counter()
        outputs: dict[str, Array] | None
        try:
            outputs, _ = self.registry.infer(job.name, job.feeds, self.timeout_s, version=job.version)
        except AgentError as exc:
            log.info("background run on %s version %s failed: %s", job.name, job.version, exc)
            outputs = None
        elapsed = time.perf_counter() - start
        self._spend(elapsed)
        job.finish(outputs, elapsed)

    def idle(self) -> bool:
        """True when no background run is queued (tests wait on it)."""
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        """Stop the thread (queued runs are dropped)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                break
        self._queue.put(None)
        thread.join(timeout=10)
