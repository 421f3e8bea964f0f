"""Benchmark: content-defined chunking speed and chunk reuse after an edit.

Run: .venv/bin/python benchmarks/bench_chunk_reuse.py [--mb 50]
Prints chunking throughput (MB/s) on a model-sized file, and the share of bytes a device
already holds after an insertion, an in-place change and an appended tail.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edgectl.artifact import chunk_file, shared_bytes


def _time_chunk(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    entry = chunk_file(path, path.name)
    return time.perf_counter() - start, len(entry.chunks)


def main() -> None:
    """Measure and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=50, help="file size in MB (default 50, ~ResNet-18 fp32)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = rng.bytes(args.mb * 1_000_000)
    mid = len(data) // 2
    edits = {
        "insert 1 KiB in the middle": data[:mid] + rng.bytes(1024) + data[mid:],
        "overwrite 2 MB in the middle": data[:mid] + rng.bytes(2_000_000) + data[mid + 2_000_000 :],
        "replace the last 2 MB (a new head)": data[:-2_000_000] + rng.bytes(2_000_000),
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "v1.bin"
        base.write_bytes(data)
        seconds, n = _time_chunk(base)
        print(f"chunk + sha256 {args.mb} MB: {seconds:.3f} s ({args.mb / seconds:.0f} MB/s), {n} chunks")
        v1 = chunk_file(base, "v1.bin").chunks
        for label, edited in edits.items():
            path = Path(tmp) / "v2.bin"
            path.write_bytes(edited)
            shared, total = shared_bytes(v1, chunk_file(path, "v2.bin").chunks)
            print(f"{label:38s} reuse {shared / total:6.1%}  fetch {(total - shared) / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
