"""The one place a chunk's bytes are checked against the manifest: ``verify_chunk``.

Every hop that moves artifact bytes (upload into the control plane's blob store, fetch into a
device's chunk store, reassembly into a bundle, loading a bundle) calls ``verify_chunk`` for each
chunk, or reads a file through ``read_verified``, which does. Each byte is hashed once per hop.

Why per chunk and not per file: once every chunk matches its signed digest and the chunks tile
the file (``FileEntry.check_chunk_cover``, run when a manifest is parsed), the file's bytes are
exactly the ones the signer named. The whole-file sha256 is a second claim about the same bytes;
it is compared once, where an artifact enters the fleet (``file_digest_matches``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from edgectl.artifact.canonical import sha256_digest
from edgectl.artifact.errors import DigestMismatchError
from edgectl.artifact.manifest import ChunkRef, FileEntry

ChunkSource = Callable[[ChunkRef], bytes]


def verify_chunk(
    data: bytes,
    expected_digest: str,
    expected_size: int | None = None,
    *,
    path: str | None = None,
    what: str = "chunk",
) -> None:
    """Raise DigestMismatchError unless ``data`` has ``expected_size`` bytes and hashes to ``expected_digest``.

    The size is compared first: a wrong-sized blob is refused without hashing it. ``path`` and
    ``what`` name the chunk in the message (e.g. ``model.onnx``, ``chunk at offset 4096``).
    """
    where = path or expected_digest
    if expected_size is not None and len(data) != expected_size:
        raise DigestMismatchError(
            where, f"{what} is {len(data)} bytes; the manifest says {expected_size}", expected=expected_digest
        )
    actual = sha256_digest(data)
    if actual != expected_digest:
        raise DigestMismatchError(
            where,
            f"{what} does not match its sha256 (bytes hash to {actual})",
            expected=expected_digest,
            actual=actual,
        )


def read_verified(entry: FileEntry, source: ChunkSource) -> Iterator[bytes]:
    """``entry``'s bytes in order, one verified chunk at a time (never the whole file in memory).

    ``source`` returns a chunk's bytes (from a blob store, a stream…); it raises what it must when
    the chunk is absent or cut short. A bad chunk stops the read before any of it is yielded.
    """
    for c in entry.chunks:
        data = source(c)
        verify_chunk(data, c.digest, c.size, path=entry.path, what=f"chunk at offset {c.offset}")
        yield data


def file_digest_matches(entry: FileEntry, source: ChunkSource) -> tuple[bool, int, str]:
    """(whether the file's bytes match ``entry.size`` and ``entry.sha256``, their size, their sha256).

    The second look at bytes whose chunks were already verified: it checks the manifest's own
    consistency (its file digest against its chunk list), so that a signed but inconsistent
    manifest never enters the fleet. Used once per artifact, when the control plane accepts it.
    """
    whole = hashlib.sha256()
    size = 0
    for c in entry.chunks:
        data = source(c)
        whole.update(data)
        size += len(data)
    return size == entry.size and whole.hexdigest() == entry.sha256, size, whole.hexdigest()
