"""A local stand-in for the cloud burst endpoint: another agent process serving a V2 model, pinned
to its own CPUs, and the pinning of this process's threads (the edge) to the others."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from loadgen import pinned  # benchmarks/, the script's own folder

from edgectl.artifact import SigningKey, public_pem
from edgectl.ports import wait_for_port
from tests.agent.onnx_models import mlp_artifact

# A cloud endpoint is tuned for throughput: it waits a little longer to fill batches.
CLOUD_QUEUE_DELAY_MS = 5


def pin_this_process(cpus: set[int]) -> set[int]:
    """Pin every thread of this process (gRPC's own included) to ``cpus``; returns the old set."""
    old = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)
    return old


def split_cpus() -> tuple[set[int], set[int]]:
    """(the edge's CPUs, the cloud's and load generator's): CPU 0 and CPU 1, as if other machines."""
    edge, other = {0}, {1}
    if len(os.sched_getaffinity(0)) < 2:
        edge = other = set(os.sched_getaffinity(0))
    return edge, other


def cloud_endpoint(
    work: Path, port: int, dims: Sequence[int], cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``edgectl agent run --serve-only`` on 127.0.0.1:``port`` serving an MLP ``dims`` as "m"."""
    key = SigningKey.generate()
    art = mlp_artifact(work / "cloud-art", work / "models", key, name="m", dims=dims)
    (work / "cloud.pub.pem").write_bytes(public_pem(key.public_key))
    argv = [
        sys.executable,
        "-c",
        "from edgectl.cli.agent import app; app()",
        "run",
        "--serve-only",
        "--model-dir",
        str(art.root),
        "--trust",
        str(work / "cloud.pub.pem"),
        "--listen",
        f"127.0.0.1:{port}",
        "--profile",
        "x86-cpu-avx2",
        "--intra-op-threads",
        "1",
        "--max-batch-size",
        "16",
        "--max-queue-delay-ms",
        str(CLOUD_QUEUE_DELAY_MS),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(pinned(argv, cpus), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_for_port("127.0.0.1", port, 60):
        proc.kill()
        raise RuntimeError("the cloud endpoint did not start")
    return proc
