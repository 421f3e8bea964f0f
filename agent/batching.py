"""Server-side micro-batching: concurrent single requests become one session run.

One worker thread per served model takes the oldest request, waits at most ``max_queue_delay``
for more that fit (same trailing shapes), concatenates them along the batch dimension, runs
once and splits the outputs. Models without a batch dimension run one request at a time on
the same worker, so the queue (and its predicted wait) means the same for every model.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgectl.agent.codecs import Array
from edgectl.agent.errors import BatcherClosedError, InferenceError

RunFn = Callable[[Mapping[str, Array]], dict[str, Array]]


@dataclass(frozen=True)
class BatchSettings:
    """Micro-batching limits: ``max_batch_size`` 1 turns batching off."""

    max_batch_size: int = 8
    max_queue_delay_s: float = 0.002
    max_queue: int = 1024


@dataclass
class _Pending:
    feeds: Mapping[str, Array]
    rows: int
    key: tuple[object, ...]
    future: Future[dict[str, Array]] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


def _trailing_key(feeds: Mapping[str, Array]) -> tuple[object, ...]:
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))


class MicroBatcher:
    """Queues requests for one model and runs them in batches on its own worker thread."""

    def __init__(
        self,
        run: RunFn,
        settings: BatchSettings,
        *,
        batchable: bool,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self.settings = settings
        self._batchable = batchable and settings.max_batch_size > 1
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        # Exponentially weighted mean of seconds per batch run, for the predicted wait.
        self._ewma_batch_s = 0.0
        # Without batching a request runs on its caller's thread, one at a time: no thread hop.
        self._inline_lock = threading.Lock()
        self._inline_waiting = 0
        self._worker = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting, not counting the batch being run."""
        return len(self._queue) + self._inline_waiting

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: a request now starts at once."""
        return not (self._queue or self._inline_waiting or self._busy)

    def predicted_wait_s(self) -> float:
        """How long a request submitted now would take to finish at the mean run time: the
        batches ahead of it and its own (the router corrects the bias of this estimate)."""
        with self._cond:
            ahead = len(self._queue) + self._inline_waiting + (1 if self._busy else 0)
        per_batch = max(self.settings.max_batch_size if self._batchable else 1, 1)
        batches = ahead // per_batch + 1
        return batches * self._ewma_batch_s

    def _observe_run(self, elapsed: float) -> None:
        alpha = 0.125 if self._ewma_batch_s else 1.0
        self._ewma_batch_s += alpha * (elapsed - self._ewma_batch_s)

    def run_inline(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Run one request on the calling thread (models without batching); same queue accounting."""
        with self._cond:
            if self._closed:
                raise BatcherClosedError("this model was swapped out; retry on the new one")
            if self._inline_waiting >= self.settings.max_queue:
                raise InferenceError(f"queue full ({self.settings.max_queue} requests); retry later")
            self._inline_waiting += 1
        self._inline_lock.acquire()
        with self._cond:
            self._inline_waiting -= 1
            self._busy = True
        start = time.perf_counter()
        try:
            return self._run(feeds)
        finally:
            elapsed = time.perf_counter() - start
            self._observe_run(elapsed)
            with self._cond:
                self._busy = False
            self._inline_lock.release()
            # Metrics after the release: the next request's run does not wait for them.
            if self._on_batch is not None:
                self._on_batch(1, elapsed)

    @property
    def inline(self) -> bool:
        """True when requests run on their caller's thread (no batching)."""
        return not self._batchable

    def submit(self, feeds: Mapping[str, Array]) -> Future[dict[str, Array]]:
        """Queue one request; BatcherClosedError after ``close`` (the caller retries on the new model)."""
        rows = next(iter(feeds.values())).shape[0] if self._batchable and feeds else 1
        item = _Pending(feeds, int(rows), _trailing_key(feeds) if self._batchable else ())
        with self._cond:
            if self._closed:
                raise BatcherClosedError("this model was swapped out; retry on the new one")
            if len(self._queue) >= self.settings.max_queue:
                raise InferenceError(f"queue full ({self.settings.max_queue} requests); retry later")
            self._queue.append(item)
            self._cond.notify()
        return item.future

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish every queued one (in-flight requests never fail), stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        # Inline requests already past the closed check finish on the old session: wait for them.
        if self._inline_lock.acquire(timeout=timeout):
            self._inline_lock.release()

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            if not self._batchable:
                self._busy = True
                return batch
            deadline = first.enqueued + self.settings.max_queue_delay_s
            while rows < self.settings.max_batch_size:
                fit = next((p for p in self._queue if p.key == first.key), None)
                if fit is not None and rows + fit.rows <= self.settings.max_batch_size:
                    self._queue.remove(fit)
                    batch.append(fit)
                    rows += fit.rows
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closed or fit is not None:
                    break
                self._cond.wait(remaining)
            self._busy = True
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            start = time.perf_counter()
            try:
                self._execute(batch)
            finally:
                elapsed = time.perf_counter() - start
                self._observe_run(elapsed)
                with self._cond:
                    self._busy = False
                if self._on_batch is not None:
                    self._on_batch(sum(p.rows for p in batch), elapsed)

    def _execute(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            item = batch[0]
            try:
                item.future.set_result(self._run(item.feeds))
            except Exception as exc:
                item.future.set_exception(exc)
            return
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        try:
            outputs = self._run(feeds)
        except Exception as exc:
            for p in batch:
                p.future.set_exception(exc)
            return
        total = sum(p.rows for p in batch)
        bad = [n for n, v in outputs.items() if v.ndim == 0 or v.shape[0] != total]
        if bad:
            err = InferenceError(f"outputs {bad} do not keep the batch dimension; cannot split a batch")
            for p in batch:
                p.future.set_exception(err)
            return
        pos = 0
        for p in batch:
            p.future.set_result({n: v[pos : pos + p.rows] for n, v in outputs.items()})
            pos += p.rows
