"""The models this agent serves, by name, with hot swap that never fails a request.

A swap installs the new model first and only then closes the old one's batcher, which
finishes everything already queued on the old session; a request that picked the old model
in the instant between is retried once on the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from edgectl.agent.batching import BatchSettings, MicroBatcher
from edgectl.agent.codecs import Array
from edgectl.agent.errors import BatcherClosedError, InferenceError, ModelNotFoundError
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.runtime import LoadedModel

log = logging.getLogger(__name__)

# After this many consecutive local failures a model counts as failing and requests burst.
FAILING_AFTER = 3
FAILING_COOLDOWN_S = 5.0


class ServedModel:
    """One loaded model with its batcher and health (consecutive failures)."""

    def __init__(self, model: LoadedModel, settings: BatchSettings, metrics: AgentMetrics | None) -> None:
        self.model = model
        self._metrics = metrics
        self.batcher = MicroBatcher(
            model.run, settings, batchable=model.batchable, on_batch=self._on_batch, name=model.name
        )
        self._failures = 0
        self._failing_until = 0.0

    def _on_batch(self, rows: int, elapsed: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_batch(self.model.name, rows, elapsed, self.batcher.queue_depth)

    @property
    def failing(self) -> bool:
        """True while the model is in its cool-down after repeated failures."""
        return time.monotonic() < self._failing_until

    def record(self, ok: bool) -> None:
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= FAILING_AFTER:
            self._failing_until = time.monotonic() + FAILING_COOLDOWN_S

    def infer(self, feeds: Mapping[str, Array], timeout: float | None) -> dict[str, Array]:
        """Validate, queue, wait; InferenceError on failure or timeout."""
        self.model.validate(feeds)
        ran = self.batcher.run_if_idle(feeds)
        if ran is not None:
            return ran
        future = self.batcher.submit(feeds)
        if self._metrics is not None:
            self._metrics.set_queue_depth(self.model.name, self.batcher.queue_depth)
        try:
            result = future.result(timeout)
        except TimeoutError as exc:
            raise InferenceError(f"model {self.model.name!r} did not answer within {timeout} s") from exc
        return result


@dataclass(frozen=True)
class ModelInfo:
    """What the registry says about one served model."""

    name: str
    version: int
    digest: str
    provider: str


class ModelRegistry:
    """Serving name -> ServedModel; swaps are atomic for readers."""

    def __init__(self, settings: BatchSettings | None = None, metrics: AgentMetrics | None = None) -> None:
        self.settings = settings or BatchSettings()
        self.metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def install(self, model: LoadedModel) -> None:
        """Serve ``model`` under its name; the previous one drains in the background."""
        served = ServedModel(model, self.settings, self.metrics)
        with self._lock:
            old = self._models.get(model.name)
            self._models[model.name] = served
        if self.metrics is not None:
            self.metrics.set_active(model.name, model.digest, model.version)
            self.metrics.swaps.labels(model.name).inc()
        if old is not None:
            # Closing waits for the old queue to drain; do not hold up the caller (the reconcile loop).
            threading.Thread(target=old.batcher.close, name=f"drain-{model.name}", daemon=True).start()
        log.info("serving %s version %d (%s) on %s", model.name, model.version, model.digest, model.provider)

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
        if old is not None:
            old.batcher.close()

    def get(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.get(name)

    def require(self, name: str) -> ServedModel:
        served = self.get(name)
        if served is None:
            raise ModelNotFoundError(f"model {name!r} is not served here (serving: {self.names() or 'none'})")
        return served

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def info(self) -> list[ModelInfo]:
        with self._lock:
            models = list(self._models.values())
        return [ModelInfo(m.model.name, m.model.version, m.model.digest, m.model.provider) for m in models]

    def infer(
        self, name: str, feeds: Mapping[str, Array], timeout: float | None = None
    ) -> tuple[dict[str, Array], LoadedModel]:
        """Run ``feeds`` on the current model of ``name``; a swap in flight is retried, never failed."""
        for _ in range(3):
            served = self.require(name)
            try:
                outputs = served.infer(feeds, timeout)
            except BatcherClosedError:
                continue
            except InferenceError:
                served.record(False)
                raise
            served.record(True)
            return outputs, served.model
        raise InferenceError(f"model {name!r} was swapped repeatedly during the request; retry")

    def close(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
        for m in models:
            m.batcher.close()
