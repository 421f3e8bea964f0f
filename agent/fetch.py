"""The one public fetcher: manifest first (verified), then only the chunks this device lacks.

Shaped like python-tuf's ngclient: ``ArtifactFetcher`` is the entry point, transports are a
narrow interface (``transports.py``), limits are a plain dataclass. The local chunk store is
both the delta source (chunks of any earlier version are never fetched again) and the resume
point: every chunk is checked against its digest and stored durably before the next one, so a
crash or a dropped stream loses at most the chunk in flight.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgectl.agent.errors import FetchError, InsufficientSpaceError
from edgectl.agent.transports import ArtifactTransport
from edgectl.artifact import LocalBlobStore, Manifest, chunks_to_fetch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchSettings:
    """Limits of one fetch: bandwidth, batching, retries, and the free space to keep."""

    bandwidth_bps: float | None = None  # bytes per second; None: unlimited
    bandwidth_burst: float | None = None  # bytes the limit lets through at once; None: 1/4 s worth
    chunks_per_request: int = 32
    max_rounds: int = 6
    retry_base_s: float = 0.2
    retry_max_s: float = 5.0
    max_bad_per_chunk: int = 3
    # Space left free after the download and the reassembled files (logs, other apps).
    reserve_bytes: int = 64 << 20


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


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
    ) -> None:
        if not transports:
            raise FetchError("no artifact transport configured", hint="pass --control-plane or --mqtt")
        self.store = store
        self.transports = list(transports)
        self.settings = settings or FetchSettings()
        self._preferred: ArtifactTransport | None = None

    def _ordered(self) -> list[ArtifactTransport]:
        """The transports, the one that last worked first (a broker-only site stays on MQTT)."""
        first = self._preferred
        return [first, *(t for t in self.transports if t is not first)] if first else list(self.transports)

    def get_manifest(self, digest: str) -> tuple[bytes, bytes, str]:
        """(manifest bytes, signature bytes, transport name) from the first transport that answers."""
        errors = []
        for t in self._ordered():
            try:
                manifest, sigs = t.get_manifest(digest)
                self._preferred = t
                return manifest, sigs, t.name
            except FetchError as exc:
                errors.append(f"{t.name}: {exc}")
        raise FetchError(f"cannot get manifest {digest}: {'; '.join(errors)}")

    def missing(self, manifest: Manifest) -> list[str]:
        """Chunk digests of ``manifest`` that the store does not hold, in file order."""
        return [c.digest for c in chunks_to_fetch(manifest, ()) if not self.store.has(c.digest)]

    def check_space(self, manifest: Manifest, root: Path) -> None:
        """Raise InsufficientSpaceError unless the chunks to fetch and the reassembled files fit."""
        sizes = {c.digest: c.size for f in manifest.files for c in f.chunks}
        need = sum(sizes[d] for d in self.missing(manifest)) + sum(f.size for f in manifest.files)
        free = shutil.disk_usage(root).free
        if free < need + self.settings.reserve_bytes:
            raise InsufficientSpaceError(
                f"{root} has {free >> 20} MiB free; artifact {manifest.name} v{manifest.version} needs "
                f"{need >> 20} MiB plus {self.settings.reserve_bytes >> 20} MiB reserve",
                hint="free disk space on the device; the agent retries",
            )

    def fetch(self, digest: str, manifest: Manifest, progress: Progress | None = None) -> FetchReport:
        """Bring every chunk of ``manifest`` into the store; resumes from whatever is already held."""
        sizes = {c.digest: c.size for f in manifest.files for c in f.chunks}
        total = sum(sizes.values())
        todo = self.missing(manifest)
        reused = total - sum(sizes[d] for d in todo)
        fetched_bytes = fetched_chunks = corrupt = 0
        bad: dict[str, int] = {}
        throttle = TokenBucket(self.settings.bandwidth_bps, self.settings.bandwidth_burst)
        used = self.transports[0].name
        errors: list[str] = []
        for round_no in range(self.settings.max_rounds):
            if not todo:
                break
            for transport in self._ordered():
                used = transport.name
                before = fetched_chunks
                try:
                    for start in range(0, len(todo), self.settings.chunks_per_request):
                        request = todo[start : start + self.settings.chunks_per_request]
                        wanted = set(request)
                        for claimed, data in transport.fetch_chunks(digest, request):
                            if claimed not in wanted:
                                continue  # not asked for (or a duplicate): never trusted, never stored
                            throttle.consume(len(data))
                            if len(data) != sizes[claimed] or _sha(data) != claimed:
                                corrupt += 1
                                bad[claimed] = bad.get(claimed, 0) + 1
                                log.warning(
                                    "chunk %s from %s is corrupt; fetching it again", claimed, transport.name
                                )
                                if bad[claimed] >= self.settings.max_bad_per_chunk:
                                    raise FetchError(
                                        f"chunk {claimed} arrived corrupt {bad[claimed]} times from {transport.name}"
                                    )
                                continue
                            self.store.put(data, expected=claimed)
                            wanted.discard(claimed)
                            fetched_bytes += len(data)
                            fetched_chunks += 1
                            if progress is not None:
                                progress(reused + fetched_bytes, total)
                    self._preferred = transport
                except FetchError as exc:
                    errors.append(f"{transport.name}: {exc}")
                    log.warning("fetch of %s via %s interrupted: %s", digest, transport.name, exc)
                todo = self.missing(manifest)
                if not todo or (errors and fetched_chunks > before):
                    # Done, or it was working before it broke: resume on the same transport.
                    self._preferred = transport
                    break
            if todo and not (fetched_chunks and errors and "corrupt" not in errors[-1]):
                delay = min(self.settings.retry_max_s, self.settings.retry_base_s * 2**round_no)
                time.sleep(delay)
        if todo:
            last = errors[-1] if errors else "chunks never arrived"
            raise FetchError(f"{len(todo)} chunks of {digest} still missing after retries ({last})")
        return FetchReport(digest, total, fetched_bytes, reused, fetched_chunks, corrupt, used)
