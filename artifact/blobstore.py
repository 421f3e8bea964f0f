"""Content-addressed blob storage: the interface, and the local-disk implementation.

A blob's key is the ``sha256:<hex>`` of its bytes, so a put is idempotent and a reader can
always check what it got. The S3 implementation (``s3store``) has the same interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from edgectl.artifact.canonical import DIGEST_PREFIX, is_digest, sha256_digest
from edgectl.artifact.errors import BlobNotFoundError, BlobStoreError, DigestMismatchError
from edgectl.artifact.integrity import verify_chunk
from edgectl.durable import fsync_dir

COPY_BUFSIZE = 1 << 20
STALE_TMP_SECONDS = 3600


def check_digest(digest: str) -> str:
    """Return the hex part of a ``sha256:`` digest, or raise BlobStoreError for a malformed one."""
    if not is_digest(digest):
        raise BlobStoreError(
            f"malformed blob digest {digest!r}", hint="expected 'sha256:' and 64 lowercase hex"
        )
    return digest[len(DIGEST_PREFIX) :]


def key_for(data: bytes, expected: str | None, expected_size: int | None = None) -> str:
    """The key ``data`` is stored under: ``expected`` once ``verify_chunk`` passes, else its sha256.

    Either way the bytes are hashed exactly once, so a caller that passes ``expected`` gets the
    chunk's check and its store in one step (the fetcher and the upload path rely on this).
    """
    if expected is None:
        return sha256_digest(data)
    check_digest(expected)
    verify_chunk(data, expected, expected_size)
    return expected


def copy_hashing(stream: BinaryIO, sink: BinaryIO) -> str:
    """Copy ``stream`` into ``sink`` block by block and return the copy's digest (streams may not fit in memory)."""
    hasher = hashlib.sha256()
    while block := stream.read(COPY_BUFSIZE):
        hasher.update(block)
        sink.write(block)
    return DIGEST_PREFIX + hasher.hexdigest()


def check_stream_digest(expected: str | None, digest: str) -> None:
    """After a streamed put: refuse the blob unless it hashed to ``expected`` (when one was given)."""
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            expected, f"received bytes hash to {digest}", expected=expected, actual=digest
        )


@runtime_checkable
class BlobStore(Protocol):
    """Bytes addressed by their sha256; every implementation behaves the same."""

    def put(self, data: bytes, *, expected: str | None = None, expected_size: int | None = None) -> str:
        """Store ``data``; returns its digest. Idempotent. DigestMismatchError if ``expected`` differs."""
        ...

    def put_stream(self, stream: BinaryIO, *, expected: str | None = None) -> str:
        """Store everything ``stream`` yields; nothing is visible until it is complete."""
        ...

    def get(self, digest: str) -> bytes:
        """The whole blob; BlobNotFoundError if absent."""
        ...

    def open(self, digest: str) -> BinaryIO:
        """A readable stream of the blob (for blobs too big to hold in memory)."""
        ...

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the blob, shorter only at its end (like ``read``)."""
        ...

    def has(self, digest: str) -> bool:
        """True if the blob is stored."""
        ...

    def size(self, digest: str) -> int:
        """The blob's length in bytes; BlobNotFoundError if absent."""
        ...

    def delete(self, digest: str) -> bool:
        """Remove the blob; False if it was not there."""
        ...

    def iter_digests(self) -> Iterator[str]:
        """Every stored digest, in no promised order."""
        ...

    def gc(self, keep: set[str]) -> list[str]:
        """Delete every blob whose digest is not in ``keep``; returns the removed digests, sorted."""
        ...


@runtime_checkable
class UrlBlobStore(Protocol):
    """A blob store whose blobs devices may GET over HTTP(S) directly (S3 presigned URLs)."""

    def presign_get(self, digest: str, ttl_s: int) -> str:
        """A credential-free URL that answers the blob's bytes for ``ttl_s`` seconds."""
        ...


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise BlobStoreError(f"invalid byte range offset={offset} length={length}")


class LocalBlobStore:
    """Blobs as files under ``root/sha256/<2 hex>/<64 hex>``, written via temp + fsync + rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._objects = self.root / "sha256"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._objects.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobStoreError(f"cannot create blob store at {self.root}: {exc.strerror}") from exc

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def path(self, digest: str) -> Path:
        """Where the blob lives (whether or not it exists)."""
        hexd = check_digest(digest)
        return self._objects / hexd[:2] / hexd

    def put(self, data: bytes, *, expected: str | None = None, expected_size: int | None = None) -> str:
        digest = key_for(data, expected, expected_size)
        if self.path(digest).exists():
            return digest  # idempotent: same digest, same bytes; keep the first copy

        def write(fh: BinaryIO) -> str:
            fh.write(data)
            return digest

        return self._commit(write)

    def put_stream(self, stream: BinaryIO, *, expected: str | None = None) -> str:
        if expected is not None:
            check_digest(expected)

        def write(fh: BinaryIO) -> str:
            digest = copy_hashing(stream, fh)
            check_stream_digest(expected, digest)
            return digest

        return self._commit(write)

    def _commit(self, write: Callable[[BinaryIO], str]) -> str:
        """Write a blob to a temp file (``write`` returns its digest), fsync, and rename it into place."""
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            final = self.path(digest)
            if final.exists():
                tmp.unlink()  # idempotent: same digest, same bytes; keep the first copy
                return digest
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)  # atomic on POSIX: readers see no blob or the whole blob
            fsync_dir(final.parent)
            return digest
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def open(self, digest: str) -> BinaryIO:
        try:
            return self.path(digest).open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFoundError(digest, str(self.root)) from exc

    def get(self, digest: str) -> bytes:
        with self.open(digest) as fh:
            return fh.read()

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        with self.open(digest) as fh:
            fh.seek(offset)
            return fh.read(length)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFoundError(digest, str(self.root)) from exc

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_digests(self) -> Iterator[str]:
        for shard in sorted(self._objects.iterdir()):
            if shard.is_dir():
                for blob in sorted(shard.iterdir()):
                    if len(blob.name) == 64:
                        yield DIGEST_PREFIX + blob.name

    def gc(self, keep: set[str]) -> list[str]:
        removed = [d for d in list(self.iter_digests()) if d not in keep and self.delete(d)]
        self._sweep_tmp()
        return sorted(removed)

    def _sweep_tmp(self, max_age: float = STALE_TMP_SECONDS) -> None:
        # Temp files of a put that crashed; a live put is younger than max_age, so it is left alone.
        cutoff = time.time() - max_age
        for tmp in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()


def missing(store: BlobStore, digests: Iterable[str]) -> list[str]:
    """The digests (in order, without repeats) that ``store`` does not hold."""
    seen: set[str] = set()
    out: list[str] = []
    for d in digests:
        if d not in seen:
            seen.add(d)
            if not store.has(d):
                out.append(d)
    return out


def open_blob_store(url: str) -> BlobStore:
    """A store from a URL: ``s3://bucket[/prefix]`` or a local directory (``file://`` optional).

    For S3, the endpoint comes from ``EDGECTL_S3_ENDPOINT`` (else boto3's own configuration).
    """
    if url.startswith("s3://"):
        # Imported here so that boto3 is loaded only by processes that use S3.
        from edgectl.artifact.s3store import S3BlobStore

        return S3BlobStore.from_url(url)
    path = url.removeprefix("file://")
    return LocalBlobStore(Path(path).expanduser())
