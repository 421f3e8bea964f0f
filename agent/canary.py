"""On-device canary and shadow: a candidate version served beside the current one, and compared.

While a model name is *on trial* (its signed order carries a canary percentage or the shadow
flag), requests that name no version are split between the current version and the candidate
by a counter (exactly P of every 100, so a test can count it), or, in shadow mode, all answered
by the current version while a copy runs on the candidate in the background. Each comparison of
the two versions' outputs on the same input feeds the agreement. The background runs, their CPU
bound and the comparison itself are ``shadow``'s; this module keeps the split, the per-version
tallies and the report.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edgectl.agent.codecs import Array
from edgectl.agent.errors import AgentError
from edgectl.agent.serving import ModelRegistry, ServedModel
from edgectl.agent.shadow import ShadowJob, ShadowWorker, compare
from edgectl.agent.state import Installed
from edgectl.artifact import ArtifactError
from edgectl.protos.v1 import mqtt_pb2 as mpb

log = logging.getLogger(__name__)

MODE_CANARY = "canary"
MODE_SHADOW = "shadow"


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
        self.worker = ShadowWorker(
            registry,
            queue_size=self.settings.queue_size,
            cpu_share=self.settings.cpu_share,
            timeout_s=self.settings.timeout_s,
        )

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
        if plan is not None:
            self.worker.start()

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
            self._offer(name, trial, plan.candidate, feeds, outputs)
        elif version == plan.candidate:
            # The candidate answered: run the current version on the same input to compare.
            self._offer(name, trial, plan.current, feeds, outputs)

    @staticmethod
    def _count(trial: _Trial, version: str, ok: bool, elapsed_s: float) -> None:
        with trial.lock:
            t = trial.tally(version)
            t.requests += 1
            t.errors += not ok
            t.latencies_ms.append(elapsed_s * 1000.0)

    def _offer(
        self, name: str, trial: _Trial, version: str, feeds: Mapping[str, Array], answer: Mapping[str, Array]
    ) -> None:
        """Hand the other version's run on ``feeds`` to the worker; ``answer`` is what was sent."""
        plan = trial.plan

        def skip() -> None:
            with trial.lock:
                trial.skipped += 1

        def finish(outputs: dict[str, Array] | None, elapsed: float) -> None:
            if version == plan.candidate:  # shadow: the candidate's only traffic is this
                self._count(trial, version, outputs is not None, elapsed)
            if outputs is None:
                return
            current, candidate = (answer, outputs) if version == plan.candidate else (outputs, answer)
            kind, rows, agreed = compare(current, candidate)
            with trial.lock:
                trial.runs += 1
                trial.compared += rows
                trial.agreed += agreed
                trial.kind = kind

        def wanted() -> bool:
            return self._trials.get(name) is trial

        watch = (plan.current, plan.candidate)
        self.worker.offer(ShadowJob(name, version, watch, feeds, finish, skip, wanted))

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
        return self.worker.idle()

    def close(self) -> None:
        """End every trial and stop the worker (queued runs are dropped)."""
        with self._lock:
            self._trials.clear()
        self.worker.close()
