"""Content-defined chunking, chunk-level transfer, reassembly and range reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgectl.artifact import (
    MAX_CHUNK,
    MIN_CHUNK,
    Artifact,
    DigestMismatchError,
    FileEntry,
    LocalBlobStore,
    TruncatedError,
    chunk_bytes,
    chunk_file,
    chunks_to_fetch,
    put_file_chunks,
    read_range,
    reassemble_file,
    shared_bytes,
)

# Small parameters so property tests explore many boundaries on little data.
SMALL = {"min_size": 256, "avg_size": 1024, "max_size": 8192}


def _random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=40_000) | st.integers(0, 200_000).map(_random))
def test_chunks_cover_the_data_exactly(data: bytes) -> None:
    chunks = chunk_bytes(data, **SMALL)
    assert b"".join(data[c.offset : c.offset + c.size] for c in chunks) == data
    pos = 0
    for i, c in enumerate(chunks):
        assert c.offset == pos
        assert c.size <= SMALL["max_size"]
        assert c.size >= SMALL["min_size"] or i == len(chunks) - 1
        pos += c.size
    assert pos == len(data)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    at=st.floats(0.1, 0.9),
    insert=st.binary(min_size=1, max_size=3000),
)
def test_insertion_keeps_most_chunks(seed: int, at: float, insert: bytes) -> None:
    data = _random(200_000, seed)
    cut = int(len(data) * at)
    edited = data[:cut] + insert + data[cut:]
    before, after = chunk_bytes(data, **SMALL), chunk_bytes(edited, **SMALL)
    shared, total = shared_bytes(before, after)
    # Boundaries follow content: only the chunks around the edit change (a fixed-size split
    # would shift and change every chunk after the insertion point).
    changed = total - shared
    assert changed <= len(insert) + 3 * SMALL["max_size"], (changed, total)
    assert shared / total > 0.8


def test_default_sizes_and_speed(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(_random(24 * 1024 * 1024, 3))
    start = time.perf_counter()
    entry = chunk_file(path, "blob.bin")
    elapsed = time.perf_counter() - start
    sizes = [c.size for c in entry.chunks]
    assert all(MIN_CHUNK <= s <= MAX_CHUNK for s in sizes[:-1])
    mean = sum(sizes) / len(sizes)
    assert 200 * 1024 <= mean <= 450 * 1024, mean
    # sha256 dominates (~0.1 s at 24 MiB); generous bound for a loaded 2-core CI box.
    assert elapsed < 3.0, f"chunking 24 MiB took {elapsed:.2f}s"


def test_empty_file_has_no_chunks(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    entry = chunk_file(tmp_path / "e", "e")
    assert entry.size == 0 and entry.chunks == ()


@pytest.fixture
def stored(tmp_path: Path) -> tuple[bytes, FileEntry, LocalBlobStore, Path]:
    data = _random(3 * 1024 * 1024 + 12345, 11)
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    entry = chunk_file(src, "model.onnx")
    store = LocalBlobStore(tmp_path / "chunks")
    assert put_file_chunks(src, entry, store) == len(data)
    return data, entry, store, src


def test_reassemble_and_resume(tmp_path: Path, stored: tuple[bytes, FileEntry, LocalBlobStore, Path]) -> None:
    data, entry, store, src = stored
    reassemble_file(store, entry, tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == data
    # Re-uploading sends nothing: every chunk is already held.
    assert put_file_chunks(src, entry, store) == 0
    # A crash mid-download leaves some chunks; the rest are what is left to fetch.
    device = LocalBlobStore(tmp_path / "device")
    for c in entry.chunks[:4]:
        device.put(store.get(c.digest))
    todo = [c for c in entry.chunks if not device.has(c.digest)]
    assert len(todo) == len(entry.chunks) - 4
    with pytest.raises(TruncatedError, match=r"model\.onnx: chunk at offset"):
        reassemble_file(device, entry, tmp_path / "dev" / "model.onnx")
    assert not (tmp_path / "dev" / "model.onnx").exists()
    for c in todo:
        device.put(store.get(c.digest))
    reassemble_file(device, entry, tmp_path / "dev" / "model.onnx")
    assert (tmp_path / "dev" / "model.onnx").read_bytes() == data


def test_corrupt_chunk_is_caught(
    tmp_path: Path, stored: tuple[bytes, FileEntry, LocalBlobStore, Path]
) -> None:
    _, entry, store, _ = stored
    victim = entry.chunks[1]
    blob = store.path(victim.digest)
    raw = bytearray(blob.read_bytes())
    raw[7] ^= 1
    blob.write_bytes(bytes(raw))
    with pytest.raises(DigestMismatchError, match=f"model.onnx: chunk at offset {victim.offset}"):
        reassemble_file(store, entry, tmp_path / "o")
    with pytest.raises(DigestMismatchError):
        read_range(store, entry, victim.offset, 10)
    # Ranges that do not touch the bad chunk still read fine.
    assert read_range(store, entry, 0, 10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 3 * 1024 * 1024 + 20000), length=st.integers(0, 2_500_000))
def test_range_reads_across_boundaries(
    stored: tuple[bytes, FileEntry, LocalBlobStore, Path], offset: int, length: int
) -> None:
    data, entry, store, _ = stored
    assert read_range(store, entry, offset, length) == data[offset : offset + length]


def test_chunks_to_fetch(tmp_path: Path, build: Callable[..., Artifact]) -> None:
    art = build(tmp_path / "b")
    m = art.manifest
    everything = chunks_to_fetch(m, set())
    assert sum(c.size for c in everything) == sum(f.size for f in m.files)
    held = {c.digest for c in everything[::2]}
    todo = chunks_to_fetch(m, held)
    assert {c.digest for c in todo} == {c.digest for c in everything} - held
    assert chunks_to_fetch(m, {c.digest for c in everything}) == []
