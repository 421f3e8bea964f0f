"""Chunk URLs: devices GET artifact bytes from the blob store itself, not through the control plane.

With an S3(-compatible) blob store the control plane signs short-lived GET URLs (SigV4 query
strings, computed locally) for the chunks a device asks for; the device fetches them over
HTTP(S) and checks each chunk against its manifest digest, as it does for gRPC Download. Devices
never hold bucket credentials, and a URL opens one object for a few minutes. The object key is
the chunk's digest, so a URL can only ever serve those bytes: HTTP caches may keep them for good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgectl.artifact import BlobStoreError, UrlBlobStore
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.errors import FailedPrecondition, InvalidArgument, Unavailable

DEFAULT_URL_TTL_S = 300
MAX_CHUNKS_PER_CALL = 1024  # bounds one call's signing work and answer size (~1 KiB per URL)


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


def chunk_urls(artifacts: ArtifactStore, digest: str, chunks: list[str], ttl_s: int) -> ChunkUrls:
    """Presigned URLs for ``chunks`` of the committed artifact ``digest``; refuses chunks it lacks.

    FailedPrecondition when the blob store cannot hand out URLs (the local-disk store): the
    caller uses Download instead, which serves every store.
    """
    store = artifacts.blobs
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
    where = artifacts.chunk_index(digest)
    wanted = list(dict.fromkeys(chunks))  # a chunk named twice is signed once
    unknown = [d for d in wanted if d not in where]
    if unknown:
        raise InvalidArgument(
            f"{len(unknown)} requested chunk(s) are not part of artifact {digest}, e.g. {unknown[0]}",
            hint="ask only for chunks the manifest lists",
        )
    expires_at = time.time() + ttl_s
    try:
        urls = tuple(ChunkUrl(d, store.presign_get(d, ttl_s), where[d][0].size) for d in wanted)
    except BlobStoreError as exc:
        raise Unavailable(str(exc), hint=exc.hint) from exc
    return ChunkUrls(urls, expires_at)
