"""The models this agent serves, by name and version, with hot swap that never fails a request.

Each name keeps its last ``keep_versions`` installed versions live (the newest is the active one,
which requests without a version reach); a swap installs the new version first and only then
closes the version that falls out, whose batcher finishes everything already queued on the old
session. A request that picked a closing version in the instant between is retried once on the
active one (or fails NOT_FOUND if it asked for that version by number).
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
from edgectl.agent.input_check import InputTable
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.model_stats import ModelStats
from edgectl.agent.runtime import LoadedModel
from edgectl.artifact import LiveSketch

log = logging.getLogger(__name__)

# After this many consecutive local failures a model counts as failing and requests burst.
FAILING_AFTER = 3
FAILING_COOLDOWN_S = 5.0


class ServedModel:
    """One loaded model version with its batcher, statistics and health (consecutive failures)."""

    def __init__(self, model: LoadedModel, settings: BatchSettings, metrics: AgentMetrics | None) -> None:
        self.model = model
        self._metrics = metrics
        self.stats = ModelStats()
        # Triton's max_batch_size: the most rows one request may carry (0 without a batch
        # dimension). The ModelConfig advertises it and the request check enforces it; the
        # micro-batch size is what combined runs aim for (the ModelConfig's preferred_batch_size).
        self.max_batch_size = (
            max(settings.max_request_rows, settings.max_batch_size) if model.batchable else 0
        )
        self.inputs = InputTable(model.name, model.inputs, self.max_batch_size)
        summary = model.input_summary
        # Live inputs against the artifact's calibration summary; None when it carries none.
        self.drift = LiveSketch(summary) if summary is not None and summary.inputs else None
        self.batcher = MicroBatcher(
            model.run, settings, batchable=model.batchable, on_batch=self._on_batch, name=model.name
        )
        self._failures = 0
        self._failing_until = 0.0

    @property
    def version(self) -> str:
        """The version as the V2 protocol spells it."""
        return str(self.model.version)

    def _on_batch(self, rows: int, requests: int, elapsed: float, queued: float) -> None:
        self.stats.batch(rows, requests, int(elapsed * 1e9), int(queued * 1e9))
        if self._metrics is not None:
            self._metrics.observe_batch(self.model.name, rows, elapsed, self.batcher.queue_depth)

    @property
    def failing(self) -> bool:
        """True while the model is in its cool-down after repeated failures."""
        return time.monotonic() < self._failing_until

    def record(self, ok: bool) -> None:
        """Count a local success or failure towards the failing state."""
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= FAILING_AFTER:
            self._failing_until = time.monotonic() + FAILING_COOLDOWN_S

    def infer(
        self, feeds: Mapping[str, Array], timeout: float | None, *, arrived: bool = False
    ) -> dict[str, Array]:
        """Validate, run (at once when alone, else batched), wait; InferenceError on failure or timeout.
        ``arrived``: the caller already counted this request with ``batcher.arrive()`` and checked
        its inputs against this version's signature (``self.inputs``)."""
        if not arrived:
            self.batcher.arrive()
        try:
            if not arrived:
                self.model.validate(feeds)
            ran = self.batcher.run_if_idle(feeds)
            if ran is not None:
                return ran
            future = self.batcher.submit(feeds)
            if self._metrics is not None:
                self._metrics.set_queue_depth(self.model.name, self.batcher.queue_depth)
            try:
                return future.result(timeout)
            except TimeoutError as exc:
                raise InferenceError(f"model {self.model.name!r} did not answer within {timeout} s") from exc
        finally:
            if not arrived:
                self.batcher.depart()


@dataclass(frozen=True)
class ModelInfo:
    """What the registry says about one served model version."""

    name: str
    version: int
    digest: str
    provider: str
    active: bool = True


class ModelRegistry:
    """Serving name -> live versions (oldest first, the last one active); swaps are atomic for readers."""

    def __init__(
        self,
        settings: BatchSettings | None = None,
        metrics: AgentMetrics | None = None,
        keep_versions: int = 1,
    ) -> None:
        self.settings = settings or BatchSettings()
        self.metrics = metrics
        self.keep_versions = max(1, keep_versions)
        self._models: dict[str, list[ServedModel]] = {}
        self._lock = threading.Lock()
        # Versions swapped out and still finishing their queue: (name, version) -> served.
        self._draining: dict[tuple[str, str], ServedModel] = {}
        if metrics is not None:
            metrics.watch_drift(self.drift_scores)
        # name -> a version kept live beyond keep_versions (the current one while a candidate is on trial).
        self._pinned: dict[str, int] = {}

    def _drain(self, old: ServedModel) -> None:
        key = (old.model.name, old.version)
        with self._lock:
            self._draining[key] = old
        try:
            old.batcher.close()
        finally:
            with self._lock:
                if self._draining.get(key) is old:
                    del self._draining[key]

    def draining(self) -> list[ServedModel]:
        """Versions swapped out that are still finishing requests they had queued."""
        with self._lock:
            return list(self._draining.values())

    def install(self, model: LoadedModel) -> None:
        """Serve ``model`` as the active version of its name; a version beyond ``keep_versions``
        (or the same version installed again) drains in the background."""
        served = ServedModel(model, self.settings, self.metrics)
        with self._lock:
            live = [m for m in self._models.get(model.name, []) if m.model.version != model.version]
            replaced = [m for m in self._models.get(model.name, []) if m.model.version == model.version]
            live.append(served)
            pinned = self._pinned.get(model.name)
            older = live[: -self.keep_versions]
            dropped = [m for m in older if m.model.version != pinned]
            self._models[model.name] = [m for m in older if m.model.version == pinned] + live[
                -self.keep_versions :
            ]
        if self.metrics is not None:
            self.metrics.set_active(model.name, model.digest, model.version)
            self.metrics.swaps.labels(model.name).inc()
        for old in (*replaced, *dropped):
            # Closing waits for the old queue to drain; do not hold up the caller (the reconcile loop).
            threading.Thread(target=self._drain, args=(old,), name=f"drain-{model.name}", daemon=True).start()
        log.info("serving %s version %d (%s) on %s", model.name, model.version, model.digest, model.provider)

    def install_pinned(self, model: LoadedModel) -> None:
        """Serve ``model`` beside the active version, as the oldest and pinned (the current version of
        a trial brought back after a restart); the active version stays what it was."""
        served = ServedModel(model, self.settings, self.metrics)
        with self._lock:
            live = self._models.get(model.name, [])
            if any(m.model.version == model.version for m in live):
                served.batcher.close()
                return
            self._pinned[model.name] = model.version
            self._models[model.name] = [served, *live]

    def pin(self, name: str, version: int | None) -> None:
        """Keep ``version`` of ``name`` live beyond ``keep_versions`` (None: unpin, and drain what
        then falls outside ``keep_versions``)."""
        with self._lock:
            if version is not None:
                self._pinned[name] = version
                return
            self._pinned.pop(name, None)
            live = self._models.get(name, [])
            dropped = live[: -self.keep_versions]
            if dropped:
                self._models[name] = live[-self.keep_versions :]
        for old in dropped:
            threading.Thread(target=self._drain, args=(old,), name=f"drain-{name}", daemon=True).start()

    def remove(self, name: str) -> None:
        """Stop serving every version of ``name``."""
        with self._lock:
            old = self._models.pop(name, [])
            self._pinned.pop(name, None)
        for m in old:
            m.batcher.close()

    def get(self, name: str) -> ServedModel | None:
        """The active version of ``name``, or None."""
        with self._lock:
            live = self._models.get(name)
            return live[-1] if live else None

    def versions(self, name: str) -> list[ServedModel]:
        """Every live version of ``name``, oldest first."""
        with self._lock:
            return list(self._models.get(name, []))

    def resolve(self, name: str, version: str = "") -> ServedModel | None:
        """The version asked for (the active one for ""), or None when not served."""
        if not version:
            return self.get(name)
        return next((m for m in self.versions(name) if m.version == version), None)

    def require(self, name: str, version: str = "") -> ServedModel:
        """``resolve``, or ModelNotFoundError saying what is served."""
        served = self.resolve(name, version)
        if served is not None:
            return served
        live = self.versions(name)
        if live and version:
            raise ModelNotFoundError(
                f"model {name!r} version {version} is not served "
                f"(serving versions {', '.join(m.version for m in live)})"
            )
        raise ModelNotFoundError(f"model {name!r} is not served here (serving: {self.names() or 'none'})")

    def names(self) -> list[str]:
        """Served model names, sorted."""
        with self._lock:
            return sorted(self._models)

    def all_versions(self) -> list[ServedModel]:
        """Every live version of every name (by name, oldest first)."""
        with self._lock:
            return [m for name in sorted(self._models) for m in self._models[name]]

    def info(self) -> list[ModelInfo]:
        """The active version of each name."""
        with self._lock:
            models = [live[-1] for live in self._models.values() if live]
        return [ModelInfo(m.model.name, m.model.version, m.model.digest, m.model.provider) for m in models]

    def infer(
        self,
        name: str,
        feeds: Mapping[str, Array],
        timeout: float | None = None,
        *,
        version: str = "",
        arrived: ServedModel | None = None,
    ) -> tuple[dict[str, Array], LoadedModel]:
        """Run ``feeds`` on ``version`` of ``name`` (the active one for ""); a swap in flight is
        retried, never failed. ``arrived``: the version the caller counted with ``arrive()``."""
        for attempt in range(3):
            # The version the caller counted is the one to try first: no second lookup.
            served = arrived if attempt == 0 and arrived is not None else self.require(name, version)
            try:
                outputs = served.infer(feeds, timeout, arrived=served is arrived)
            except BatcherClosedError:
                continue
            except InferenceError:
                served.record(False)
                raise
            served.record(True)
            return outputs, served.model
        raise InferenceError(f"model {name!r} was swapped repeatedly during the request; retry")

    def drift_scores(self) -> list[tuple[str, str, float]]:
        """(name, version, PSI) of every live version that has a drift score yet."""
        out = []
        for m in self.all_versions():
            score = m.drift.score() if m.drift is not None else None
            if score is not None:
                out.append((m.model.name, m.version, score.score))
        return out

    def close(self) -> None:
        """Close every version's batcher."""
        with self._lock:
            models = [m for live in self._models.values() for m in live]
            self._models.clear()
        for m in models:
            m.batcher.close()
