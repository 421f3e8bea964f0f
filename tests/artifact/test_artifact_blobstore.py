"""The BlobStore contract, run against local disk, S3 over moto's real HTTP server, and a real
S3-compatible endpoint when EDGECTL_TEST_S3_ENDPOINT names one."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.artifact import (
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    DigestMismatchError,
    LocalBlobStore,
    missing,
    open_blob_store,
)
from edgectl.artifact.s3store import S3BlobStore
from edgectl.ports import free_port
from tests.conftest import S3Endpoint, real_s3

boto3 = pytest.importorskip("boto3")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _moto_store(endpoint: S3Endpoint) -> S3BlobStore:
    client = endpoint.client()
    bucket = f"edgectl-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    return S3BlobStore(bucket, "blobs", client=client)


def _real_store(endpoint: S3Endpoint) -> S3BlobStore:
    client = endpoint.client()
    bucket = os.environ.get("EDGECTL_TEST_S3_BUCKET", "edgectl-test")
    try:
        client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    except Exception:
        client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    # A fresh prefix per test: the bucket may be shared, and gc must see only this test's blobs.
    return S3BlobStore(bucket, f"edgectl-test/{uuid.uuid4().hex}", client=client)


# moto's server always runs; a real endpoint joins when EDGECTL_TEST_S3_ENDPOINT names one (no skips).
STORES = ["local", "s3-moto", *(["s3-real"] if real_s3() is not None else [])]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    if request.param == "s3-moto":
        s3 = _moto_store(request.getfixturevalue("moto_s3"))
    else:
        endpoint = real_s3()
        assert endpoint is not None
        s3 = _real_store(endpoint)
    try:
        yield s3
    finally:
        s3.gc(set())


def test_put_get_is_content_addressed_and_idempotent(store: BlobStore) -> None:
    data = os.urandom(100_000)
    d = store.put(data)
    assert d == _digest(data)
    assert store.put(data) == d and store.put_stream(io.BytesIO(data)) == d
    assert list(store.iter_digests()) == [d]
    assert store.get(d) == data and store.size(d) == len(data) and store.has(d)
    with store.open(d) as fh:
        assert fh.read() == data


def test_expected_digest_is_enforced(store: BlobStore) -> None:
    with pytest.raises(DigestMismatchError):
        store.put(b"evil", expected=_digest(b"good"))
    with pytest.raises(DigestMismatchError):
        store.put_stream(io.BytesIO(b"evil"), expected=_digest(b"good"))
    assert list(store.iter_digests()) == []
    assert store.put(b"good", expected=_digest(b"good")) == _digest(b"good")


def test_range_reads(store: BlobStore) -> None:
    data = bytes(range(256)) * 40
    d = store.put(data)
    for offset, length in [(0, 1), (10, 100), (1000, 5000), (len(data) - 3, 10), (len(data), 5), (5, 0)]:
        assert store.read_range(d, offset, length) == data[offset : offset + length], (offset, length)
    with pytest.raises(BlobStoreError):
        store.read_range(d, -1, 4)


def test_missing_blobs_and_delete(store: BlobStore) -> None:
    ghost = _digest(b"never stored")
    assert not store.has(ghost)
    for call in (store.get, store.size, store.open):
        with pytest.raises(BlobNotFoundError, match="not found"):
            call(ghost)
    with pytest.raises(BlobNotFoundError):
        store.read_range(ghost, 0, 1)
    d = store.put(b"x")
    assert store.delete(d) and not store.delete(d) and not store.has(d)
    with pytest.raises(BlobStoreError, match="malformed"):
        store.has("md5:abc")


def test_gc_keeps_the_keep_set(store: BlobStore) -> None:
    blobs = [store.put(f"blob {i}".encode()) for i in range(7)]
    keep = set(blobs[:3])
    removed = store.gc(keep)
    assert removed == sorted(set(blobs) - keep)
    assert sorted(store.iter_digests()) == sorted(keep)
    assert store.gc(keep) == []
    assert missing(store, [*blobs, blobs[0]]) == blobs[3:]


class _FailingStream(io.RawIOBase):
    """Yields some bytes, checks the store shows nothing yet, then fails like a dropped connection."""

    def __init__(self, store: BlobStore, digest: str, fail: bool) -> None:
        self.store, self.digest, self.fail, self.calls = store, digest, fail, 0

    def read(self, n: int = -1) -> bytes:
        self.calls += 1
        assert not self.store.has(self.digest), "a blob became visible before it was complete"
        if self.calls <= 3:
            return b"a" * 1024
        if self.fail:
            raise ConnectionError("peer went away")
        return b""


def test_put_is_atomic(store: BlobStore) -> None:
    digest = _digest(b"a" * 3072)
    with pytest.raises(ConnectionError):
        store.put_stream(_FailingStream(store, digest, fail=True))  # type: ignore[arg-type]
    assert list(store.iter_digests()) == []
    if isinstance(store, LocalBlobStore):
        assert list((store.root / "tmp").iterdir()) == [], "a failed put left a temp file"
    assert store.put_stream(_FailingStream(store, digest, fail=False)) == digest  # type: ignore[arg-type]
    assert store.get(digest) == b"a" * 3072


def test_local_layout_and_durability(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "b")
    d = store.put(b"hello")
    path = store.path(d)
    assert path.parent.name == d[7:9] and path.name == d[7:]
    mtime = path.stat().st_mtime_ns
    store.put(b"hello")
    assert path.stat().st_mtime_ns == mtime, "an idempotent put must not rewrite the blob"
    # A stale temp file from a crashed put is swept by gc, a blob in the keep-set is not.
    stale = tmp_path / "b" / "tmp" / "put-crashed"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    assert store.gc({d}) == [] and not stale.exists() and store.has(d)


def test_open_blob_store_urls(tmp_path: Path, moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    moto_endpoint = moto_s3.url
    assert isinstance(open_blob_store(str(tmp_path / "x")), LocalBlobStore)
    assert isinstance(open_blob_store(f"file://{tmp_path / 'y'}"), LocalBlobStore)
    monkeypatch.setenv("EDGECTL_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"edgectl-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    s3 = open_blob_store(f"s3://{bucket}/fleet-a")
    assert isinstance(s3, S3BlobStore) and s3.prefix == "fleet-a/"
    d = s3.put(b"over real http")
    assert s3.key(d) == f"fleet-a/sha256/{d[7:]}"
    assert open_blob_store(f"s3://{bucket}/fleet-a").get(d) == b"over real http"
    with pytest.raises(BlobStoreError, match="not an S3 URL"):
        S3BlobStore.from_url("s3:///nobucket")


def test_serve_with_an_s3_url_naming_no_bucket_is_bad_input(tmp_path: Path) -> None:
    # Exit 2 (fix your input), not 4, which says an artifact failed a check (docs/cli.md).
    listen, state = f"127.0.0.1:{free_port()}", f"sqlite:///{tmp_path / 'state.db'}"
    serve = ["control-plane", "serve", "--insecure", "--blobs", "s3://", "--listen", listen, "--state", state]
    cmd = [sys.executable, "-m", "edgectl", *serve]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "not an S3 URL: 's3://'" in result.stderr and "Traceback" not in result.stderr


def test_s3_many_blobs_paginate(moto_s3: S3Endpoint) -> None:
    s3 = _moto_store(moto_s3)
    s3.page_size = 7  # S3 pages at 1000; a small page proves the continuation logic cheaply
    digests = {s3.put(str(i).encode()) for i in range(30)}
    assert set(s3.iter_digests()) == digests
    assert len(s3.gc(set(list(digests)[:2]))) == 28 and len(list(s3.iter_digests())) == 2
