"""The reconcile loop: desired != active -> fetch -> verify -> stage -> load -> smoke test -> swap -> report.

One thread owns every change to what is served. MQTT callbacks only put messages on its inbox.
The persisted state is written after the new model already serves (so a crash in between
restarts on the old one, which is still on disk, and converges again) and names the previous
version, which stays on disk for an instant rollback. Refusals are final for their digest and
are reported; transient failures (network, disk) are retried with backoff, never reported as
failed, and never stop serving.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgectl.agent.artifacts import LocalArtifacts, load_and_smoke_test
from edgectl.agent.canary import Trials, on_trial
from edgectl.agent.engines import choose_engine
from edgectl.agent.errors import AgentError, FetchError, RefusedError
from edgectl.agent.fetch import ArtifactFetcher
from edgectl.agent.metrics import AgentMetrics
from edgectl.agent.orders import AcceptedOrder, FleetTrust
from edgectl.agent.report import FetchProgress, RepeatedReports, Reporter, StateReports
from edgectl.agent.runtime import SessionSettings
from edgectl.agent.serving import ModelRegistry
from edgectl.agent.staging import Staged, SwapWindows
from edgectl.agent.state import AgentState, Installed, ModelSlot, StateStore
from edgectl.agent.verify import DeviceFit, check_fit, check_identity, check_rollback, verify_signed
from edgectl.artifact import ArtifactError
from edgectl.backoff import Backoff
from edgectl.devices import HostFacts
from edgectl.protos.v1 import mqtt_pb2 as mpb

log = logging.getLogger(__name__)
Kind = mpb.EventKind
# Fault injection for the crash tests: EDGECTL_AGENT_CRASHPOINT=<name> makes the agent kill
# itself with SIGKILL (a real kill -9, no cleanup) when it reaches that step.
CRASHPOINT_ENV = "EDGECTL_AGENT_CRASHPOINT"
STATE_RETRY = "$state"  # the retry timer of a pass that could not write the state file
WINDOW_RETRY = "$window:"  # + model name: look again when its maintenance window opens


def crashpoint(name: str) -> None:
    """SIGKILL this process at ``name`` when the environment asks for it (tests only)."""
    if os.environ.get(CRASHPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ReconcileSettings:
    """The parts of the agent's configuration the loop needs."""

    device_id: str
    fit: DeviceFit
    facts: HostFacts | None = None
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 30.0
    idle_report_s: float = 300.0  # a report that repeats the last one is re-sent at most this often
    intra_op_threads: int = 0
    engine_cache_dir: Path | None = None
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    drift_threshold: float = 0.25
    progress_interval_s: float = 10.0  # FETCH_PROGRESS at quarter marks, at most this often


class Reconciler:
    """Owns the state file, the installed artifacts and every swap of the registry."""

    def __init__(
        self,
        settings: ReconcileSettings,
        store: StateStore,
        artifacts: LocalArtifacts,
        fetcher: ArtifactFetcher,
        registry: ModelRegistry,
        metrics: AgentMetrics,
        reporter: Reporter,
        fleet_trust: FleetTrust | None = None,
        clock: Callable[[], float] = time.time,
        trials: Trials | None = None,
    ) -> None:
        """``clock``: wall time for maintenance windows (tests inject one; order expiry stays real)."""
        self.settings = settings
        self.swaps = SwapWindows(clock)  # staged artifacts waiting for a maintenance window
        self.trials = trials
        self.store = store
        self.artifacts = artifacts
        self.fetcher = fetcher
        self.registry = registry
        self.metrics = metrics
        self.reporter = reporter
        self.reports = StateReports(settings.device_id, settings.fit.profile.name, settings.labels,
                                    settings.drift_threshold, metrics, registry, reporter)  # fmt: skip
        self.fleet_trust = fleet_trust
        self.state: AgentState = store.load()
        self.desired: mpb.DesiredState | None = None
        self.order: AcceptedOrder | None = None  # the newest order accepted, with its epoch and expiry
        self.order_refusal = ""  # why the last desired state was refused, until a valid one arrives
        if fleet_trust is None or not fleet_trust.required:
            log.warning("no fleet key: desired states are followed unsigned (insecure dev mode)")
        self.inbox: queue.Queue[mpb.DesiredState | str] = queue.Queue()
        self.last_error = ""
        self._retry: dict[str, tuple[float, int]] = {}  # digest -> (next attempt at, attempts)
        self._backoff = Backoff(settings.retry_min_s, settings.retry_max_s)  # jittered: no herd
        self._refused: set[tuple[str, int]] = set()  # (digest, generation) refused this run
        self._sent = RepeatedReports(settings.idle_report_s)  # an unchanged report waits its turn

    # -- called from other threads: only enqueue --------------------------------------------
    def submit(self, desired: mpb.DesiredState) -> None:
        self.inbox.put(desired)

    def request_report(self) -> None:
        self.inbox.put("report")

    # -- the loop -----------------------------------------------------------------------------
    def restore(self) -> None:
        """Serve what the state file names; if the active copy is damaged, the previous one."""
        for slot in list(self.state.models.values()):
            for candidate in (slot.active, slot.previous):
                if candidate is None:
                    continue
                try:
                    self._load(candidate)
                except (AgentError, ArtifactError) as exc:
                    log.error("cannot serve %s %s after restart: %s", slot.name, candidate.digest, exc)
                    continue
                if candidate is not slot.active:
                    slot.active, slot.previous = candidate, None
                    self.store.save(self.state)
                break

    def run(self, stop: threading.Event) -> None:
        """Process the inbox until ``stop`` is set; heartbeats and retries run on timers."""
        next_beat = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.publish_report(heartbeat=True)
                next_beat = now + self.settings.heartbeat_s
            wake = min([next_beat, *(t for t, _ in self._retry.values())])
            try:
                item = self.inbox.get(timeout=max(0.01, min(wake - time.monotonic(), 1.0)))
            except queue.Empty:
                item = None
            if isinstance(item, mpb.DesiredState):
                self._accept(item)
            elif item == "report":
                self.publish_report()
            # Coalesce: only the newest desired state matters.
            while True:
                try:
                    more = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, mpb.DesiredState):
                    self._accept(more)
            if item is not None or any(t <= time.monotonic() for t, _ in self._retry.values()):
                self._reconcile_guarded()

    def _reconcile_guarded(self) -> None:
        """reconcile(), but a disk that cannot be written (full, read-only) must not end the loop:
        nothing would ever converge again. What serves is untouched; the pass runs again later."""
        attempts = self._retry.pop(STATE_RETRY, (0.0, 0))[1] + 1
        try:
            self.reconcile()
        except OSError as exc:
            delay = self._backoff.delay(attempts)
            self._retry[STATE_RETRY] = (time.monotonic() + delay, attempts)
            self.last_error = f"cannot write the agent's state: {exc} (retry in {delay:.0f} s)"
            log.warning("%s", self.last_error)
            self.publish_report()

    def _accept(self, desired: mpb.DesiredState) -> None:
        if self.fleet_trust is not None:
            last = max((self.state.order_epoch, self.state.observed_generation),
                       self.order.position if self.order else (0, 0))  # fmt: skip
            try:
                order = self.fleet_trust.check(desired, self.settings.device_id, last)
            except RefusedError as exc:
                self._refuse_order(str(exc))
                return
            if order.expires_at is not None:
                if order.position > last:
                    self.order_refusal = ""
                if self.order is None or order.position >= self.order.position:
                    self.order, self.desired = order, order.desired
                return
            desired = order.desired
        if desired.generation < self.state.observed_generation:
            log.info(
                "ignoring stale desired state generation %d < %d",
                desired.generation,
                self.state.observed_generation,
            )
            return
        if self.desired is None or desired.generation >= self.desired.generation:
            self.desired = desired

    def _refuse_order(self, reason: str) -> None:
        """A desired state that must not be followed: keep the current order, say why."""
        self.order_refusal = f"desired state refused: {reason}"
        log.warning("%s", self.order_refusal)
        self.metrics.refusals.labels("(desired state)").inc()
        self._event(Kind.EVENT_KIND_REFUSED, "", self.order_refusal)

    def reconcile(self) -> None:
        """One pass over the desired models; each converges, is refused, or is scheduled for retry."""
        desired = self.desired
        if desired is None:
            return
        epoch = self.order.epoch if self.order else self.state.order_epoch
        if (epoch, desired.generation) != (self.state.order_epoch, self.state.observed_generation):
            self.state.order_epoch, self.state.observed_generation = epoch, desired.generation
            self._retry.clear()
            self.store.save(self.state)
        wanted = {dm.name for dm in desired.models}
        for name in set(self.swaps.names()) - wanted:
            self.swaps.forget(name)
            self._retry.pop(WINDOW_RETRY + name, None)
        for name in sorted(set(self.state.models) - wanted) if desired.exclusive else ():
            self._drop(name)
        for dm in desired.models:
            self._converge(dm, desired.generation)
            if self.trials is not None:  # start, keep or end dm's canary / shadow trial
                slot = self.state.slot(dm.name)
                self.trials.follow(dm, slot.active, slot.previous, lambda i: self._load(i, pinned=True))
        self.publish_report()

    def _converge(self, dm: mpb.DesiredModel, generation: int) -> None:
        slot = self.state.slot(dm.name)
        if slot.active is not None and slot.active.digest == dm.digest:
            self._retry.pop(WINDOW_RETRY + dm.name, None)
            self.swaps.forget(dm.name)
            if slot.failed_digest:
                slot.failed_digest = slot.failure_reason = ""
                self.store.save(self.state)
            return
        if (dm.digest, generation) in self._refused:
            return
        retry = self._retry.get(dm.digest)
        if retry is not None and retry[0] > time.monotonic():
            return
        if self.trials is not None and self.trials.plan(dm.name) is not None:
            # A trial's versions may go with this install: stop splitting before they do.
            self.trials.set(dm.name, None)
        if on_trial(dm) and slot.active is not None:
            # The version served now stays live beside the candidate (beyond keep_versions).
            self.registry.pin(dm.name, slot.active.version)
        try:
            window = self.swaps.window(dm)
            staged = self.swaps.staged(dm) or self.swaps.put(dm.name, self._stage(dm, slot))
            wait = self.swaps.wait(dm, window)
            if wait is not None:  # downloaded and verified; the swap waits for the window
                self._retry[WINDOW_RETRY + dm.name] = (time.monotonic() + wait.delay_s, 0)
                if wait.message:
                    self._event(Kind.EVENT_KIND_STAGED, dm.digest, wait.message)
                return
            self._retry.pop(WINDOW_RETRY + dm.name, None)
            self.swaps.forget(dm.name)
            self._activate(dm, slot, staged.installed, staged.providers)
        except RefusedError as exc:
            self.swaps.forget(dm.name)
            self._refused.add((dm.digest, generation))
            self._retry.pop(dm.digest, None)
            slot.failed_digest, slot.failure_reason = dm.digest, str(exc)
            self.store.save(self.state)
            self.metrics.refusals.labels(dm.name).inc()
            self.last_error = f"{dm.name}: refused {dm.digest}: {exc}"
            log.warning("%s", self.last_error)
            self._event(Kind.EVENT_KIND_REFUSED, dm.digest, str(exc))
        except (FetchError, AgentError, ArtifactError, OSError) as exc:
            attempts = (retry[1] if retry else 0) + 1
            delay = self._backoff.delay(attempts)
            self._retry[dm.digest] = (time.monotonic() + delay, attempts)
            self.last_error = f"{dm.name}: {exc} (retry in {delay:.0f} s)"
            log.warning("%s", self.last_error)
            self._event(Kind.EVENT_KIND_FAILED, dm.digest, f"{exc}; retrying in {delay:.0f} s")

    def _drop(self, name: str) -> None:
        """An exclusive order no longer names ``name`` (e.g. its device left a continuous rollout's
        selector and ran nothing before): stop serving it. The state file is written after, so a crash in
        between serves it again on restart and drops it on the next pass."""
        self.registry.remove(name)
        if self.trials is not None:
            self.trials.set(name, None)
        del self.state.models[name]
        self.store.save(self.state)
        log.info("stopped serving %s: the desired state no longer names it", name)
        self._event(Kind.EVENT_KIND_SWAPPED, "", f"stopped serving {name}: no longer desired")

    def _stage(self, dm: mpb.DesiredModel, slot: ModelSlot) -> Staged:
        """Fetch, verify and install on disk (not serving yet); returns it and the providers that fit."""
        digest = dm.digest
        self._event(Kind.EVENT_KIND_FETCH_STARTED, digest, f"fetching {dm.name} version {dm.version or '?'}")
        manifest_bytes, signatures, _ = self.fetcher.get_manifest(digest)
        vm = verify_signed(digest, manifest_bytes, signatures, self.artifacts.trust)
        check_identity(vm.manifest, dm.name, dm.version)
        check_rollback(vm.manifest, slot.active.version if slot.active else None, dm.rollback)
        providers = check_fit(vm.manifest, self.settings.fit)
        self._event(Kind.EVENT_KIND_VERIFIED, digest, f"signed by {', '.join(vm.signers)}")
        self.fetcher.check_space(vm.manifest, self.artifacts.data_dir)
        milestones = FetchProgress(self.settings.progress_interval_s)

        def progress(done: int, total: int) -> None:
            if milestones.due(done, total):
                self._event(Kind.EVENT_KIND_FETCH_PROGRESS, digest, "downloading", done, total)

        report = self.fetcher.fetch(digest, vm.manifest, progress)
        self.metrics.fetched_bytes.labels(report.transport).inc(report.bytes_fetched)
        self.metrics.delta_saved_bytes.inc(report.bytes_reused)
        installed = self.artifacts.install(vm, signatures)
        self._event(
            Kind.EVENT_KIND_STAGED,
            digest,
            f"fetched {report.bytes_fetched} bytes, reused {report.bytes_reused} of {report.bytes_total}",
        )
        return Staged(installed, providers)

    def _activate(
        self, dm: mpb.DesiredModel, slot: ModelSlot, installed: Installed, providers: tuple[str, ...]
    ) -> None:
        """Load, smoke-test and swap a staged artifact in; then commit the state file."""
        digest = dm.digest
        crashpoint("before-swap")
        model_provider = self._load(installed, providers)
        crashpoint("after-swap-before-commit")
        self._event(Kind.EVENT_KIND_SMOKE_TEST_PASSED, digest, f"golden outputs match on {model_provider}")
        previous = slot.active if slot.active and slot.active.digest != digest else slot.previous
        slot.active, slot.previous = installed, previous
        slot.smoke_test_passed, slot.provider = True, model_provider
        slot.failed_digest = slot.failure_reason = ""
        self.store.save(self.state)  # the commit point: a restart now serves the new version
        crashpoint("after-commit")
        self._event(Kind.EVENT_KIND_SWAPPED, digest, f"serving {dm.name} version {installed.version}")
        self.last_error = ""
        keep = [i for s in self.state.models.values() for i in (s.active, s.previous) if i]
        self.artifacts.gc(keep + self.swaps.keep())

    def _load(
        self, installed: Installed, providers: tuple[str, ...] | None = None, pinned: bool = False
    ) -> str:
        """Verify, load, smoke-test and install one artifact into the registry; returns its EP."""
        artifact = self.artifacts.load(installed)
        engine = choose_engine(artifact, self.settings.fit.profile, self.settings.facts)
        order = providers if providers is not None else check_fit(artifact.manifest, self.settings.fit)
        cache = self.settings.engine_cache_dir / installed.path if self.settings.engine_cache_dir else None
        session = SessionSettings(
            providers=order,
            intra_op_threads=self.settings.intra_op_threads,
            engine_cache_dir=cache,
            prebuilt_engine=engine.prebuilt,
        )
        model = load_and_smoke_test(artifact, session)
        # The swap: new requests go to the new session at once; queued ones finish on the old.
        (self.registry.install_pinned if pinned else self.registry.install)(model)
        return model.provider

    # -- reporting ----------------------------------------------------------------------------
    def build_report(self) -> mpb.ReportedState:
        """What this device runs now, as the control plane reads it."""
        last_error = self.order_refusal or self._order_expiry() or self.last_error
        return self.reports.build(self.state, self.swaps, self.trials, last_error)

    def _order_expiry(self) -> str:
        """A freeze shows: the order followed has expired and no fresh one came (control plane gone,
        or someone withholding its messages). What serves keeps serving."""
        expires = self.order.expires_at if self.order else None
        if expires is None or time.time() < expires:
            return ""
        at = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
        return f"the control plane's signed desired state expired at {at}"

    def publish_report(self, heartbeat: bool = False) -> None:
        """Send the reported state; on a heartbeat, only if it says something new or is due again."""
        report = self.build_report()
        content = RepeatedReports.content(report)
        if heartbeat and not self._sent.due(content):
            return
        self.reporter.report(report)
        self._sent.sent(content)
        if heartbeat:
            self._event(Kind.EVENT_KIND_HEARTBEAT, "", "alive")

    def _event(
        self, kind: mpb.EventKind.ValueType, digest: str, message: str, done: int = 0, total: int = 0
    ) -> None:
        self.reports.event(kind, digest, message, done, total)
