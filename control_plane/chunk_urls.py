"""Chunk URLs: devices GET artifact bytes from the blob store itself, not through the control plane.

With an S3(-compatible) blob store the control plane signs short-lived GET URLs (SigV4 query
strings, computed locally) for the chunks a device asks for; the device fetches them over
HTTP(S) and checks each chunk against its manifest digest, as it does for gRPC Download. Devices
never hold bucket credentials, and a URL opens one object for a few minutes. The object key is
the chunk's digest, so a URL can only ever serve those bytes: HTTP caches may keep them for good.

A chunk's URL names nothing about the device, so every device asking within the same window
gets the same URL (``ChunkUrlSigner``): signing costs once per chunk per half-TTL, not once per
device, and a cache in front of the bucket sees one URL per chunk, not one per device. The same
URLs ride along with the manifest (``ChunkUrlSigner.offered``) when a device asks for them there,
which spares each device its second gRPC call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from edgectl.artifact import BlobStoreError, ChunkRef, FileEntry, UrlBlobStore
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.errors import FailedPrecondition, InvalidArgument, Unavailable

DEFAULT_URL_TTL_S = 300
MAX_CHUNKS_PER_CALL = 1024  # bounds one call's signing work and answer size (~1 KiB per URL)
MAX_CACHED = 100_000  # cached URLs (~1 KiB each) before the expired ones are dropped
MAX_OFFERS = 1_000  # artifacts whose offered URLs are kept before the expired ones are dropped


@dataclass(frozen=True)
class ChunkUrl:
    """One chunk's presigned GET URL and its size in bytes."""

    digest: str
    url: str
    size: int


@dataclass(frozen=True)
class ChunkUrls:
    """The URLs of one request, each chunk once in request order, and when they stop working."""

    urls: tuple[ChunkUrl, ...]
    expires_at: float


class ChunkUrlSigner:
    """Presigned URLs for an artifact's chunks, each reused while at least half its life is left."""

    def __init__(self, artifacts: ArtifactStore, ttl_s: int = DEFAULT_URL_TTL_S) -> None:
        self.artifacts = artifacts
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[str, float]] = {}  # chunk digest -> (url, expires at)
        self._offers: dict[str, ChunkUrls] = {}  # artifact digest -> the URLs a manifest answer carries
        self._lock = threading.Lock()
        self.signed = 0  # URLs signed so far (the cache's misses)

    def urls(self, digest: str, chunks: list[str]) -> ChunkUrls:
        """URLs for ``chunks`` of the committed artifact ``digest``; refuses chunks it lacks.

        FailedPrecondition when the blob store cannot hand out URLs (the local-disk store): the
        caller uses Download instead, which serves every store.
        """
        store = self.artifacts.blobs
        if not isinstance(store, UrlBlobStore):
            raise FailedPrecondition(
                f"this control plane's blob store ({type(store).__name__}) hands out no URLs",
                hint="fetch the chunks with ArtifactService.Download; URLs need an s3:// blob store",
            )
        if not chunks:
            raise InvalidArgument("GetChunkUrls needs the chunk digests to sign", hint="list them in chunks")
        if len(chunks) > MAX_CHUNKS_PER_CALL:
            raise InvalidArgument(
                f"GetChunkUrls takes at most {MAX_CHUNKS_PER_CALL} chunks per call, got {len(chunks)}",
                hint="ask in batches",
            )
        wanted, where = self.artifacts.requested_chunks(digest, chunks)  # a chunk named twice is signed once
        return self._signed(store, wanted, where)

    def offered(self, digest: str) -> ChunkUrls | None:
        """URLs for the committed artifact ``digest``'s chunks (its first MAX_CHUNKS_PER_CALL), or
        None when the blob store hands out none: what a manifest answer carries, so that a device
        needs no second call. A device that needs chunks past these asks GetChunkUrls for them."""
        store = self.artifacts.blobs
        if not isinstance(store, UrlBlobStore):
            return None
        # Every device of a rollout asks for the same artifact: its answer is kept (the same object,
        # so that callers may keep what they built from it) while its URLs would be reused anyway.
        now = time.time()
        with self._lock:
            kept = self._offers.get(digest)
        if kept is not None and kept.expires_at - now >= self.ttl_s / 2:
            return kept
        where = self.artifacts.chunk_index(digest)
        made = self._signed(store, list(where)[:MAX_CHUNKS_PER_CALL], where)
        with self._lock:
            if len(self._offers) >= MAX_OFFERS:
                self._offers = {k: v for k, v in self._offers.items() if v.expires_at > now}
            self._offers[digest] = made
        return made

    def _signed(
        self, store: UrlBlobStore, wanted: list[str], where: dict[str, tuple[ChunkRef, FileEntry]]
    ) -> ChunkUrls:
        signed = [self._url(store, d) for d in wanted]
        return ChunkUrls(
            tuple(ChunkUrl(d, url, where[d][0].size) for d, (url, _) in zip(wanted, signed, strict=True)),
            min(expires for _, expires in signed),
        )

    def _url(self, store: UrlBlobStore, chunk: str) -> tuple[str, float]:
        now = time.time()
        with self._lock:
            hit = self._cache.get(chunk)
        if hit is not None and hit[1] - now >= self.ttl_s / 2:
            return hit
        try:
            made = (store.presign_get(chunk, self.ttl_s), now + self.ttl_s)
        except BlobStoreError as exc:
            raise Unavailable(str(exc), hint=exc.hint) from exc
        with self._lock:
            if len(self._cache) >= MAX_CACHED:  # drop the expired before growing further
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            self._cache[chunk] = made
            self.signed += 1
        return made
