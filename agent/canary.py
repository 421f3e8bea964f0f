"""On-device canary and shadow: a candidate version served beside the current one, and compared.

While a model name is *on trial* (its signed order carries a canary percentage or the shadow
flag), requests that name no version are split between the current version and the candidate
by a counter (exactly P of every 100, so a test can count it), or, in shadow mode, all answered
by the current version while a copy runs on the candidate in the background. Each comparison of
the two versions' outputs on the same input feeds the agreement: top-1 agreement for classifier
outputs (``[batch, classes]`` floats), mean cosine otherwise.

Background runs go through one worker with a bounded queue and a CPU budget (a token bucket
worth ``cpu_share`` of one core): when the queue is full, the budget spent, or either version
has requests waiting, the run is skipped and counted; the answer the caller gets never waits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgectl.agent.codecs import Array
from edgectl.agent.errors import AgentError
from edgectl.agent.serving import ModelRegistry, ServedModel
from edgectl.agent.state import Installed
from edgectl.artifact import ArtifactError
from edgectl.protos.v1 import mqtt_pb2 as mpb

log = logging.getLogger(__name__)

MODE_CANARY = "canary"
MODE_SHADOW = "shadow"
KIND_TOP1 = "top1"
KIND_COSINE = "cosine"
BACKGROUND_NICE = 19


@dataclass(frozen=True)
class TrialPlan:
    """One name on trial: the candidate and current versions (V2 spelling) and how to split."""

    candidate: str
    current: str
    percent: float = 0.0
    shadow: bool = False

    @property
    def mode(self) -> str:
        return MODE_SHADOW if self.shadow else MODE_CANARY


@dataclass(frozen=True)
class TrialSettings:
    """Limits on background comparison runs."""

    queue_size: int = 64
    cpu_share: float = 0.25  # of one core, averaged over about a second
    latency_window: int = 4096  # latency samples kept per version for the percentiles
    timeout_s: float = 5.0


@dataclass(frozen=True)
class VersionReport:
    """One version's requests, errors and latency percentiles while on trial."""

    version: str
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class TrialReport:
    """What a device says about one name on trial; ``agreement`` is None until something was compared."""

    mode: str
    percent: float
    current: str
    candidate: str
    compared: int
    agreement: float | None
    agreement_kind: str
    background_runs: int
    background_skipped: int
    versions: tuple[VersionReport, ...]


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=deque)


@dataclass
class _Trial:
    plan: TrialPlan
    window: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0
    tallies: dict[str, _Tally] = field(default_factory=dict)
    compared: int = 0
    agreed: float = 0.0  # rows with equal top-1, or the sum of row cosines
    kind: str = ""
    runs: int = 0
    skipped: int = 0

    def tally(self, version: str) -> _Tally:
        t = self.tallies.get(version)
        if t is None:
            t = self.tallies[version] = _Tally(latencies_ms=deque(maxlen=self.window))
        return t


@dataclass(frozen=True)
class _Job:
    name: str
    trial: _Trial
    version: str  # the version to run in the background
    feeds: Mapping[str, Array]
    reference: Mapping[str, Array]  # the current version's outputs on the same feeds


def on_trial(dm: mpb.DesiredModel) -> bool:
    """True when the order asks to run ``dm`` as a canary or shadow beside the current version."""
    return dm.canary_percent > 0 or dm.shadow


def fill_trial(out: mpb.TrialStats, report: TrialReport) -> None:
    """Copy a trial's measurements into the reported state."""
    out.mode, out.canary_percent = report.mode, report.percent
    out.current_version, out.candidate_version = int(report.current), int(report.candidate)
    out.compared, out.agreement = report.compared, report.agreement or 0.0
    out.agreement_kind = report.agreement_kind
    out.background_runs, out.background_skipped = report.background_runs, report.background_skipped
    for v in report.versions:
        out.versions.add(
            version=int(v.version), requests=v.requests, errors=v.errors,
            p50_ms=v.p50_ms, p95_ms=v.p95_ms, p99_ms=v.p99_ms,
        )  # fmt: skip


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


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class Trials:
    """The names on trial, their split counters, per-version tallies and the background worker."""

    def __init__(self, registry: ModelRegistry, settings: TrialSettings | None = None) -> None:
        self.registry = registry
        self.settings = settings or TrialSettings()
        self._trials: dict[str, _Trial] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max(1, self.settings.queue_size))
        self._tokens = self.settings.cpu_share
        self._refilled = time.monotonic()
        self._worker: threading.Thread | None = None

    # -- plans (the reconcile loop) ------------------------------------------------------------
    def set(self, name: str, plan: TrialPlan | None) -> None:
        """Put ``name`` on trial with ``plan`` (None: off trial); a changed plan starts fresh counts."""
        with self._lock:
            old = self._trials.get(name)
            if plan is None:
                self._trials.pop(name, None)
            elif old is None or old.plan != plan:
                self._trials[name] = _Trial(plan, self.settings.latency_window)
                log.info("%s on trial: %s", name, plan)
            if plan is not None and self._worker is None:
                self._worker = threading.Thread(target=self._run, name="canary-shadow", daemon=True)
                self._worker.start()

    def follow(
        self,
        dm: mpb.DesiredModel,
        active: Installed | None,
        previous: Installed | None,
        load_current: Callable[[Installed], object] | None = None,
    ) -> None:
        """Put ``dm`` on trial beside the previous version once it serves, or end its trial: an
        order without the trial fields promotes the candidate (the previous version drains).
        ``load_current`` brings the previous version back beside the candidate when it is not
        live (the agent restarted mid-trial and restored only the active one)."""
        wanted = (
            on_trial(dm)
            and active is not None
            and active.digest == dm.digest
            and previous is not None
            and previous.version != active.version
        )
        if wanted and previous is not None and self.registry.resolve(dm.name, str(previous.version)) is None:
            try:
                if load_current is not None:
                    load_current(previous)
            except (AgentError, ArtifactError) as exc:
                log.warning(
                    "cannot load %s version %d beside the candidate: %s", dm.name, previous.version, exc
                )
        if wanted and active and previous and self.registry.resolve(dm.name, str(previous.version)):
            self.registry.pin(dm.name, previous.version)
            self.set(
                dm.name, TrialPlan(str(active.version), str(previous.version), dm.canary_percent, dm.shadow)
            )
        elif self.plan(dm.name) is not None or on_trial(dm):
            self.set(dm.name, None)
            self.registry.pin(dm.name, None)

    def plan(self, name: str) -> TrialPlan | None:
        """The plan ``name`` is on, or None."""
        trial = self._trials.get(name)
        return trial.plan if trial else None

    # -- the request path (the router's hook) --------------------------------------------------
    def pick(self, name: str, version: str) -> str:
        """The version to serve a call with: the one it names, else current or candidate by the split."""
        trial = self._trials.get(name)
        if version or trial is None:
            return version
        plan = trial.plan
        if plan.shadow or plan.percent <= 0:
            return plan.current
        with trial.lock:
            n = trial.counter
            trial.counter += 1
        # Request n goes to the candidate when it crosses the next multiple of 100/P: exactly P %.
        hit = math.floor((n + 1) * plan.percent / 100.0) > math.floor(n * plan.percent / 100.0)
        return plan.candidate if hit else plan.current

    def done(
        self,
        name: str,
        served: ServedModel,
        ok: bool,
        elapsed_s: float,
        feeds: Mapping[str, Array] | None,
        outputs: Mapping[str, Array] | None,
    ) -> None:
        """One locally answered call: count it for its version; queue its comparison run."""
        trial = self._trials.get(name)
        if trial is None:
            return
        plan, version = trial.plan, served.version
        if version not in (plan.current, plan.candidate):
            return
        self._count(trial, version, ok, elapsed_s)
        if not ok or feeds is None or outputs is None:
            return
        if version == plan.current and plan.shadow:
            self._offer(_Job(name, trial, plan.candidate, feeds, outputs))
        elif version == plan.candidate:
            # The candidate answered: run the current version on the same input to compare.
            self._offer(_Job(name, trial, plan.current, feeds, outputs))

    @staticmethod
    def _count(trial: _Trial, version: str, ok: bool, elapsed_s: float) -> None:
        with trial.lock:
            t = trial.tally(version)
            t.requests += 1
            t.errors += not ok
            t.latencies_ms.append(elapsed_s * 1000.0)

    def _offer(self, job: _Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with job.trial.lock:
                job.trial.skipped += 1

    # -- the background worker -------------------------------------------------------------------
    def _budget(self) -> bool:
        now = time.monotonic()
        share = self.settings.cpu_share
        self._tokens = min(share, self._tokens + (now - self._refilled) * share)
        self._refilled = now
        return self._tokens > 0

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

    def _background(self, job: _Job) -> None:
        trial, plan = job.trial, job.trial.plan
        other = self.registry.resolve(job.name, job.version)
        current = self.registry.resolve(job.name, plan.current)
        busy = any(m is None or not m.batcher.idle for m in (other, current))
        if busy or not self._budget() or self._trials.get(job.name) is not trial:
            with trial.lock:
                trial.skipped += 1
            return
        start = time.perf_counter()
        try:
            outputs, _ = self.registry.infer(
                job.name, job.feeds, self.settings.timeout_s, version=job.version
            )
            ok = True
        except AgentError as exc:
            log.info("background run on %s version %s failed: %s", job.name, job.version, exc)
            outputs, ok = {}, False
        elapsed = time.perf_counter() - start
        self._tokens -= elapsed
        if job.version == plan.candidate:  # shadow: the candidate's only traffic is this
            self._count(trial, job.version, ok, elapsed)
        if not ok:
            return
        reference, other_out = (
            (job.reference, outputs) if job.version == plan.candidate else (outputs, job.reference)
        )
        kind, rows, agreed = compare(reference, other_out)
        with trial.lock:
            trial.runs += 1
            trial.compared += rows
            trial.agreed += agreed
            trial.kind = kind

    # -- reporting -------------------------------------------------------------------------------
    def report(self, name: str) -> TrialReport | None:
        """Where ``name``'s trial stands, or None when it is not on trial."""
        trial = self._trials.get(name)
        if trial is None:
            return None
        plan = trial.plan
        with trial.lock:
            versions = tuple(
                VersionReport(
                    v,
                    t.requests,
                    t.errors,
                    *(_percentile(list(t.latencies_ms), q) for q in (0.5, 0.95, 0.99)),
                )
                for v, t in sorted(trial.tallies.items())
            )
            agreement = trial.agreed / trial.compared if trial.compared else None
            return TrialReport(
                plan.mode, plan.percent, plan.current, plan.candidate, trial.compared, agreement,
                trial.kind, trial.runs, trial.skipped, versions,
            )  # fmt: skip

    def idle(self) -> bool:
        """True when no background run is queued (tests wait on it)."""
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        """Stop the worker (queued runs are dropped)."""
        with self._lock:
            self._trials.clear()
            worker, self._worker = self._worker, None
        if worker is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            worker.join(timeout=10)
