"""Content-defined chunking (FastCDC 2020 via pyfastcdc) and chunk-level transfer helpers.

Chunk boundaries depend on content, not offsets, so two model versions that differ in one
layer share every chunk away from the change; a device that holds a chunk from any earlier
version never fetches it again, and a download resumes at chunk granularity after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from edgectl.artifact.blobstore import BlobStore
from edgectl.artifact.errors import BlobNotFoundError, TruncatedError
from edgectl.artifact.integrity import ChunkSource, read_verified, verify_chunk
from edgectl.artifact.manifest import ChunkRef, FileEntry, Manifest

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

MIN_CHUNK = 64 * 1024
AVG_CHUNK = 256 * 1024
MAX_CHUNK = 1024 * 1024
_READ = 1 << 20


def _chunker(min_size: int, avg_size: int, max_size: int) -> FastCDC:
    # Imported on use: a device that only verifies and reassembles chunks never cuts any.
    # pyfastcdc's mean chunk is avg_size + min_size (cut-point skipping): ~320 KiB here.
    from pyfastcdc import FastCDC

    return FastCDC(avg_size, min_size=min_size, max_size=max_size)


def chunk_bytes(
    data: bytes, *, min_size: int = MIN_CHUNK, avg_size: int = AVG_CHUNK, max_size: int = MAX_CHUNK
) -> tuple[ChunkRef, ...]:
    """Cut ``data`` into content-defined chunks with their sha256."""
    return tuple(
        ChunkRef(c.offset, c.length, hashlib.sha256(c.data).hexdigest())
        for c in _chunker(min_size, avg_size, max_size).cut_buf(data)
    )


def chunk_file(
    path: Path,
    rel_path: str,
    *,
    min_size: int = MIN_CHUNK,
    avg_size: int = AVG_CHUNK,
    max_size: int = MAX_CHUNK,
) -> FileEntry:
    """Hash and chunk a file in one pass (mmap'd by pyfastcdc); returns its manifest entry."""
    whole = hashlib.sha256()
    chunks: list[ChunkRef] = []
    size = path.stat().st_size
    if size:  # mmap of an empty file fails; an empty file simply has no chunks
        for c in _chunker(min_size, avg_size, max_size).cut_file(path):
            whole.update(c.data)
            chunks.append(ChunkRef(c.offset, c.length, hashlib.sha256(c.data).hexdigest()))
    entry = FileEntry(rel_path, size, whole.hexdigest(), tuple(chunks))
    entry.check_chunk_cover()
    return entry


def chunks_to_fetch(manifest: Manifest, held: Collection[str]) -> list[ChunkRef]:
    """The chunks a device must fetch given the digests (``sha256:<hex>``) it already holds.

    Each digest appears once, in file/offset order, so a fetcher can stream them in order.
    """
    have = set(held)
    return [c for c, _ in chunk_locations(manifest).values() if c.digest not in have]


def chunk_locations(manifest: Manifest) -> dict[str, tuple[ChunkRef, FileEntry]]:
    """Chunk digest -> (the chunk, its file) at its first occurrence, in file/offset order.

    A chunk shared by two files (or repeated in one) is listed once: it is stored, sent and
    verified once.
    """
    out: dict[str, tuple[ChunkRef, FileEntry]] = {}
    for f in manifest.files:
        for c in f.chunks:
            out.setdefault(c.digest, (c, f))
    return out


def all_chunk_digests(manifest: Manifest) -> set[str]:
    """Every chunk digest the manifest refers to (the keep-set for a store's gc)."""
    return set(chunk_locations(manifest))


def chunk_sizes(manifest: Manifest) -> dict[str, int]:
    """Chunk digest -> its size in bytes, each distinct chunk once."""
    return {d: c.size for d, (c, _) in chunk_locations(manifest).items()}


def put_file_chunks(path: Path, entry: FileEntry, store: BlobStore) -> int:
    """Store ``path``'s chunks as blobs (skipping ones already held); returns bytes uploaded."""
    sent = 0
    with path.open("rb") as fh:
        for c in entry.chunks:
            if store.has(c.digest):
                continue
            fh.seek(c.offset)
            data = fh.read(c.size)
            if len(data) != c.size:
                raise TruncatedError(entry.path, f"file ends before chunk at offset {c.offset}")
            store.put(data, expected=c.digest, expected_size=c.size)
            sent += c.size
    return sent


def store_source(store: BlobStore, entry: FileEntry) -> ChunkSource:
    """Chunks of ``entry`` from ``store``, for ``read_verified``; an absent one is a TruncatedError."""

    def source(chunk: ChunkRef) -> bytes:
        try:
            return store.get(chunk.digest)
        except BlobNotFoundError as exc:
            raise TruncatedError(
                entry.path, f"chunk at offset {chunk.offset} ({chunk.digest}) is not held"
            ) from exc

    return source


def read_chunk(store: BlobStore, entry: FileEntry, chunk: ChunkRef) -> bytes:
    """One chunk from the store, verified against the manifest before anyone uses it."""
    data = store_source(store, entry)(chunk)
    verify_chunk(data, chunk.digest, chunk.size, path=entry.path, what=f"chunk at offset {chunk.offset}")
    return data


def read_range(store: BlobStore, entry: FileEntry, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of a file held as chunks, across chunk boundaries.

    Only the chunks that overlap the range are read, each verified whole (chunks are <= 1 MiB).
    The result is shorter than ``length`` only at the end of the file, as ``read`` would be.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"invalid range offset={offset} length={length}")
    end = min(offset + length, entry.size)
    parts: list[bytes] = []
    for c in entry.chunks:
        if c.offset + c.size <= offset or c.offset >= end:
            continue
        data = read_chunk(store, entry, c)
        lo = max(offset, c.offset) - c.offset
        hi = min(end, c.offset + c.size) - c.offset
        parts.append(data[lo:hi])
    return b"".join(parts)


def reassemble_file(store: BlobStore, entry: FileEntry, dest: Path) -> None:
    """Write ``entry`` to ``dest`` from its chunks, verifying each chunk as it is read.

    The file appears at ``dest`` only once complete and verified (temp file, fsync, rename).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for data in read_verified(entry, store_source(store, entry)):
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def shared_bytes(old: Iterable[ChunkRef], new: Iterable[ChunkRef]) -> tuple[int, int]:
    """(bytes of ``new`` whose chunks also occur in ``old``, total bytes of ``new``)."""
    have = {c.sha256 for c in old}
    new_list = list(new)
    return sum(c.size for c in new_list if c.sha256 in have), sum(c.size for c in new_list)
