"""Server-side micro-batching: concurrent single requests become one session run.

One worker thread per served model takes the oldest request, waits at most ``max_queue_delay``
for more that fit (same trailing shapes), concatenates them along the batch dimension, runs
once and splits the outputs. Models without batching run one request at a time: on the caller's
own thread when the model is idle (no thread hop, ~0.1 ms less per request), else through the
queue and the worker, which runs queued requests back to back on one hot thread. Handing the
session from one gRPC thread to the next instead left it idle 5 % of the time and slowed each
run (a 0.85-0.89 throughput ratio against a direct session, 0.95-1.03 through the worker;
benchmarks/bench_agent.py). The queue and its predicted wait mean the same for every model.

Batching never taxes a lone caller: the front-ends count requests from the moment they arrive
(``arrive``/``depart``, before decoding), and the worker waits for more rows only while other
requests are on their way or queued; a request that finds the model idle with nobody else
around runs at once on its own thread, batching on or off (as Triton's dynamic batcher does not
wait by default). Callers that overlap (their mean count in flight is above 1.5) do wait:
there the delay buys batches.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgectl.agent.codecs import Array
from edgectl.agent.errors import BatcherClosedError, InferenceError

log = logging.getLogger(__name__)
RunFn = Callable[[Mapping[str, Array]], dict[str, Array]]
OVERLAPPING = 1.5
# on_batch(rows, requests, seconds the run took, seconds its requests waited in the queue, summed)
OnBatch = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class BatchSettings:
    """Micro-batching limits: ``max_batch_size`` rows at most in one combined run (1 turns batching
    off; Triton's ``preferred_batch_size``), and ``max_request_rows``, the most rows one request may
    carry (Triton's ``max_batch_size``: ServedModel.max_batch_size, never below the micro-batch)."""

    max_batch_size: int = 8
    max_queue_delay_s: float = 0.002
    max_queue: int = 1024
    max_request_rows: int = 1024


@dataclass(eq=False)  # identity: the queue removes *this* request, never compares numpy inputs
class _Pending:
    feeds: Mapping[str, Array]
    rows: int
    key: tuple[object, ...]
    future: Future[dict[str, Array]] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


def _trailing_key(feeds: Mapping[str, Array]) -> tuple[object, ...]:
    """What requests must share to be stacked along the first dimension. A request whose inputs
    disagree on that dimension (a model whose free first dimensions are not one batch: points and
    queries, or an input that broadcasts) matches no other request, so it runs alone."""
    if len({a.shape[0] if a.ndim else None for a in feeds.values()}) > 1:
        return (object(),)
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))


class MicroBatcher:
    """Queues requests for one model and runs them in batches on its own worker thread."""

    def __init__(
        self,
        run: RunFn,
        settings: BatchSettings,
        *,
        batchable: bool,
        on_batch: OnBatch | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self.settings = settings
        self._batchable = batchable and settings.max_batch_size > 1
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        # One lock, two conditions: the worker waits on ``_cond`` (work to take, rows to batch);
        # ``close`` waits on ``_drained``. A finished run then wakes nobody who has nothing to do
        # (waking the idle worker on every request cost ~50 us of GIL hand-offs).
        # Bookkeeping that waits for nobody takes the lock itself (``_lock``): a Condition's
        # ``with`` goes through Python-level __enter__/__exit__, four times per request.
        self._lock = lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._drained = threading.Condition(lock)
        self._filling = False  # the worker waits for more rows of a batch
        self._closed = False
        # Batches taken (by the worker or a caller running its own request) and not yet finished.
        self._active = 0
        # Requests between ``arrive`` and ``depart`` (decoding, queued, running), and how many of
        # them are in a run now: the rest are worth waiting for.
        self._pending = 0
        self._running = 0
        # Mean requests in flight seen by arrivals (EWMA): above ~1.5 callers overlap, so a batch
        # forms within the delay even when nobody else has arrived yet; a lone caller keeps it at 1.
        self._concurrency = 1.0
        # Held around every session run: the worker's and the callers' runs never overlap.
        self._run_lock = threading.Lock()
        # Exponentially weighted mean of seconds per batch run, for the predicted wait.
        self._ewma_batch_s = 0.0
        self._worker = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting, not counting the batch being run."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: a request now starts at once."""
        return not (self._queue or self._active)

    def arrive(self) -> None:
        """A request for this model has arrived (call before decoding it; ``depart`` when done)."""
        with self._lock:
            self._pending += 1
            self._concurrency += 0.125 * (self._pending - self._concurrency)

    def depart(self) -> None:
        """The request counted by ``arrive`` is answered or refused."""
        with self._lock:
            self._pending -= 1
            if self._filling:
                self._cond.notify()

    def _others_coming(self, taken: int) -> bool:
        return self._pending - taken - self._running > 0 or self._concurrency > OVERLAPPING

    def predicted_wait_s(self) -> float:
        """How long a request submitted now would take to finish at the mean run time: the
        batches ahead of it and its own (the router corrects the bias of this estimate)."""
        with self._cond:
            ahead = len(self._queue) + self._active
        per_batch = max(self.settings.max_batch_size if self._batchable else 1, 1)
        batches = ahead // per_batch + 1
        return batches * self._ewma_batch_s

    def _observe_run(self, elapsed: float) -> None:
        alpha = 0.125 if self._ewma_batch_s else 1.0
        self._ewma_batch_s += alpha * (elapsed - self._ewma_batch_s)

    def run_if_idle(self, feeds: Mapping[str, Array]) -> dict[str, Array] | None:
        """Run one request on the calling thread if the model is idle and no other request is on
        its way to batch with it, else None (then ``submit`` it). BatcherClosedError after ``close``."""
        with self._lock:
            if self._closed:
                raise BatcherClosedError("this model was swapped out; retry on the new one")
            if self._queue or self._active or (self._batchable and self._others_coming(1)):
                return None
            self._active += 1
            self._running += 1
        rows = int(next(iter(feeds.values())).shape[0]) if self._batchable and feeds else 1
        start = time.perf_counter()
        try:
            with self._run_lock:
                return self._run(feeds)
        finally:
            self._finished(rows, 1, time.perf_counter() - start, 0.0)

    def _finished(self, rows: int, requests: int, elapsed: float, queued: float) -> None:
        self._observe_run(elapsed)
        with self._lock:
            self._active -= 1
            self._running -= requests
            if self._closed:
                self._drained.notify_all()
        # Metrics after the bookkeeping: the next request's run does not wait for them.
        if self._on_batch is not None:
            self._on_batch(rows, requests, elapsed, queued)

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
        # Requests a caller is running itself finish on the old session: wait for them.
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._active and (remaining := deadline - time.monotonic()) > 0:
                self._drained.wait(remaining)

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            if not self._batchable:
                self._active += 1
                self._running += 1
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
                # Wait only for requests on their way: nobody else around means nothing to wait for.
                if remaining <= 0 or self._closed or fit is not None or not self._others_coming(len(batch)):
                    break
                self._filling = True
                self._cond.wait(remaining)
                self._filling = False
            self._active += 1
            self._running += len(batch)
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            start = time.perf_counter()
            queued = sum(start - p.enqueued for p in batch)
            try:
                with self._run_lock:
                    self._execute(batch)
            except Exception as exc:  # a bug here must fail this batch, never stop the worker
                log.exception("%s failed a batch", self._worker.name)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(InferenceError(f"batch failed: {exc}"))
            finally:
                self._finished(sum(p.rows for p in batch), len(batch), time.perf_counter() - start, queued)

    def _execute(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            item = batch[0]
            try:
                item.future.set_result(self._run(item.feeds))
            except Exception as exc:
                item.future.set_exception(exc)
            return
        try:
            feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
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
