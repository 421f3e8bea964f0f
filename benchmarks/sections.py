"""What the sectioned benchmarks share: the command line (``--quick`` and ``--only``, the host's
load printed first since numbers from a loaded host read differently, each section in one
temporary folder), the mean-time-per-call timer and the direct onnxruntime session compared against."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import onnxruntime as ort


def run_sections(
    description: str,
    sections: Mapping[str, Callable[[Path, bool], None]],
    prefix: str,
    quick_help: str = "short runs",
) -> None:
    """Parse ``--quick``/``--only``, print the host's cores and load, run the chosen sections."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--only", choices=sections, action="append", help="run only these sections")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"host: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)"
    )
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for name in args.only or sections:
            sections[name](Path(tmp), args.quick)


def timed(fn: Callable[[], object], n: int) -> float:
    """Mean seconds per call of ``fn`` over ``n`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def direct_session(path: Path) -> ort.InferenceSession:
    """A plain single-threaded onnxruntime CPU session: the baseline the served numbers are compared to."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
