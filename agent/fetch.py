"""The one public fetcher: manifest first (verified), then only the chunks this device lacks.

Shaped like python-tuf's ngclient: ``ArtifactFetcher`` is the entry point, transports are a
narrow interface (``transports.py``), limits are a plain dataclass. The local chunk store is
both the delta source (chunks of any earlier version are never fetched again) and the resume
point: every chunk is checked against its digest and stored durably before the next one, so a
crash or a dropped stream loses at most the chunk in flight.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.agent.errors import FetchError, InsufficientSpaceError
from edgectl.agent.transports import ArtifactTransport
from edgectl.artifact import DigestMismatchError, LocalBlobStore, Manifest, chunk_sizes, chunks_to_fetch
from edgectl.backoff import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchSettings:
    """Limits of one fetch: bandwidth, batching, retries, and the free space to keep."""

    bandwidth_bps: float | None = None  # bytes per second; None: unlimited
    bandwidth_burst: float | None = None  # bytes the limit lets through at once; None: 1/4 s worth
    chunks_per_request: int = 32
    max_rounds: int = 6
    # Between rounds: edgectl.backoff.Backoff, a wait drawn from [0, min(max, base * 2**(n-1))].
    retry_base_s: float = 0.2
    retry_max_s: float = 5.0
    max_bad_per_chunk: int = 3
    # Space left free after the download and the reassembled files (logs, other apps).
    reserve_bytes: int = 64 << 20
    # How long a fallback stays first once it took over from a transport that declared itself
    # better (``prefer_over``); then that one is tried again (presigned URLs after one failed
    # S3 GET). None: until the fallback itself fails.
    sticky_s: float | None = None


@dataclass(frozen=True)
class FetchReport:
    """What one fetch moved: bytes downloaded, bytes already held (delta saving), corrupt chunks."""

    digest: str
    bytes_total: int
    bytes_fetched: int
    bytes_reused: int
    chunks_fetched: int
    corrupt_chunks: int
    transport: str


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RoundResult:
    """What one round on one transport did; the fetch loop decides from these fields alone."""

    transport: str
    chunks_stored: int
    bytes_stored: int
    corrupt: int  # chunks that arrived with the wrong size or digest (refused, never stored)
    error: str | None  # why the round ended early (a cut stream, a server error), or None
    gave_up_on: str | None = None  # a chunk refused ``max_bad_per_chunk`` times: the source is bad

    @property
    def made_progress(self) -> bool:
        return self.chunks_stored > 0

    @property
    def resume_at_once(self) -> bool:
        """It was working before it broke (a cut stream): resume on it without waiting."""
        return self.made_progress and self.error is not None and self.gave_up_on is None


class TokenBucket:
    """Bandwidth limit: ``rate`` bytes/s refill a bucket of ``burst`` bytes; taking more waits.

    A chunk larger than the bucket is let through on credit and the debt is slept off, so
    ``n`` bytes never pass faster than ``(n - burst) / rate`` seconds.
    """

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else (rate or 0.0) / 4
        self._tokens = self.burst
        self._last = time.monotonic()

    def consume(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens, sleeping while in debt; returns the seconds slept."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        time.sleep(wait)
        return wait


class ArtifactFetcher:
    """Fetch an artifact's missing chunks into the local chunk store, trying transports in order."""

    def __init__(
        self,
        store: LocalBlobStore,
        transports: Sequence[ArtifactTransport],
        settings: FetchSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not transports:
            raise FetchError("no artifact transport configured", hint="pass --control-plane or --mqtt")
        self.store = store
        self.transports = list(transports)
        self.settings = settings or FetchSettings()
        self._preferred: ArtifactTransport | None = None
        self._preferred_since = 0.0
        self._rng = rng  # None: a fresh Random per process; tests pass a seeded one

    def _prefer(self, transport: ArtifactTransport) -> None:
        if transport is not self._preferred:
            self._preferred, self._preferred_since = transport, time.monotonic()

    def _ordered(self) -> list[ArtifactTransport]:
        """The transports, the one that last worked first (a broker-only site stays on MQTT)."""
        sticky = self.settings.sticky_s
        # Only a fallback some transport declared itself better than (``prefer_over``: presigned
        # URLs over gRPC Download) gives way after ``sticky_s``; a broker-only site stays on MQTT.
        if (
            sticky is not None
            and time.monotonic() - self._preferred_since > sticky
            and any(getattr(t, "prefer_over", None) is self._preferred for t in self.transports)
        ):
            self._preferred = None  # the configured order again: the better one gets a new try
        first = self._preferred
        return [first, *(t for t in self.transports if t is not first)] if first else list(self.transports)

    def get_manifest(self, digest: str) -> tuple[bytes, bytes, str]:
        """(manifest bytes, signature bytes, transport name) from the first transport that answers."""
        errors = []
        for t in self._ordered():
            try:
                manifest, sigs = t.get_manifest(digest)
                self._prefer(t)
                return manifest, sigs, t.name
            except FetchError as exc:
                errors.append(f"{t.name}: {exc}")
        raise FetchError(f"cannot get manifest {digest}: {'; '.join(errors)}")

    def missing(self, manifest: Manifest) -> list[str]:
        """Chunk digests of ``manifest`` that the store does not hold, in file order."""
        return [c.digest for c in chunks_to_fetch(manifest, ()) if not self.store.has(c.digest)]

    def check_space(self, manifest: Manifest, root: Path) -> None:
        """Raise InsufficientSpaceError unless the chunks to fetch and the reassembled files fit."""
        sizes = chunk_sizes(manifest)
        need = sum(sizes[d] for d in self.missing(manifest)) + sum(f.size for f in manifest.files)
        free = shutil.disk_usage(root).free
        if free < need + self.settings.reserve_bytes:
            raise InsufficientSpaceError(
                f"{root} has {free >> 20} MiB free; artifact {manifest.name} v{manifest.version} needs "
                f"{need >> 20} MiB plus {self.settings.reserve_bytes >> 20} MiB reserve",
                hint="free disk space on the device; the agent retries",
            )

    def fetch(self, digest: str, manifest: Manifest, progress: Progress | None = None) -> FetchReport:
        """Bring every chunk of ``manifest`` into the store; resumes from whatever is already held.

        Up to ``max_rounds`` rounds; each tries the transports in order (the last one that
        worked first) until one finishes or makes progress. Between rounds the loop waits a
        jittered backoff, except when a transport broke after making progress (a cut stream).
        """
        sizes = chunk_sizes(manifest)
        total = sum(sizes.values())
        todo = self.missing(manifest)
        reused = total - sum(sizes[d] for d in todo)
        throttle = TokenBucket(self.settings.bandwidth_bps, self.settings.bandwidth_burst)
        job = _FetchJob(digest, sizes, throttle, progress, done_bytes=reused)
        backoff = Backoff(self.settings.retry_base_s, self.settings.retry_max_s, rng=self._rng)
        rounds: list[RoundResult] = []
        for round_no in range(self.settings.max_rounds):
            if not todo:
                break
            for transport in self._ordered():
                result = self._round(transport, job, todo)
                rounds.append(result)
                if result.error is None:
                    self._prefer(transport)
                todo = self.missing(manifest)
                if not todo or result.made_progress:
                    self._prefer(transport)  # done, or it works: stay with it
                    break
            last = rounds[-1]
            if last.made_progress:
                backoff.reset()
            if todo and not last.resume_at_once and round_no + 1 < self.settings.max_rounds:
                time.sleep(backoff.next())
        fetched = sum(r.chunks_stored for r in rounds)
        fetched_bytes = sum(r.bytes_stored for r in rounds)
        corrupt = sum(r.corrupt for r in rounds)
        if todo:
            errors = [f"{r.transport}: {r.error}" for r in rounds if r.error is not None]
            last_error = errors[-1] if errors else "chunks never arrived"
            raise FetchError(f"{len(todo)} chunks of {digest} still missing after retries ({last_error})")
        used = rounds[-1].transport if rounds else self.transports[0].name
        return FetchReport(digest, total, fetched_bytes, reused, fetched, corrupt, used)

    def _round(self, transport: ArtifactTransport, job: _FetchJob, todo: list[str]) -> RoundResult:
        """Ask ``transport`` for ``todo`` in batches; store each chunk once it passes ``verify_chunk``."""
        stored = stored_bytes = corrupt = 0
        # A transport may take bigger batches (presigned URLs: one control-plane call per batch).
        batch = max(self.settings.chunks_per_request, getattr(transport, "max_batch", 0))
        try:
            for start in range(0, len(todo), batch):
                request = todo[start : start + batch]
                wanted = set(request)
                for claimed, data in transport.fetch_chunks(job.digest, request):
                    if claimed not in wanted:
                        continue  # not asked for (or a duplicate): never trusted, never stored
                    job.throttle.consume(len(data))
                    try:
                        # The one check of this hop: the store verifies size and digest, then writes.
                        self.store.put(data, expected=claimed, expected_size=job.sizes[claimed])
                    except DigestMismatchError:
                        corrupt += 1
                        job.bad[claimed] = job.bad.get(claimed, 0) + 1
                        log.warning("chunk %s from %s is corrupt; fetching it again", claimed, transport.name)
                        if job.bad[claimed] >= self.settings.max_bad_per_chunk:
                            error = f"chunk {claimed} arrived corrupt {job.bad[claimed]} times"
                            log.warning("fetch of %s via %s stopped: %s", job.digest, transport.name, error)
                            return RoundResult(transport.name, stored, stored_bytes, corrupt, error, claimed)
                        continue
                    wanted.discard(claimed)
                    stored += 1
                    stored_bytes += len(data)
                    job.done_bytes += len(data)
                    if job.progress is not None:
                        job.progress(job.done_bytes, job.total)
        except FetchError as exc:
            log.warning("fetch of %s via %s interrupted: %s", job.digest, transport.name, exc)
            return RoundResult(transport.name, stored, stored_bytes, corrupt, str(exc))
        return RoundResult(transport.name, stored, stored_bytes, corrupt, None)


@dataclass
class _FetchJob:
    """What the rounds of one fetch share: sizes, the bandwidth limit, bad-chunk counts, progress."""

    digest: str
    sizes: dict[str, int]
    throttle: TokenBucket
    progress: Progress | None
    done_bytes: int = 0  # held before the fetch plus stored since: what progress reports
    bad: dict[str, int] = field(default_factory=dict)  # chunk digest -> corrupt arrivals

    @property
    def total(self) -> int:
        return sum(self.sizes.values())
