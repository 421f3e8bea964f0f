"""An open-loop KServe V2 load generator that keeps every request: when it was sent, how long it took,
where it was served. Run as a child process (its own GIL) by ``run_trace``.

A benchmark that switches something on and off while the load runs (``bench_canary.py``'s shadow)
classifies each request by its send time: both run on CLOCK_MONOTONIC, which is system-wide.
``python trace_load.py TARGET RATE SECONDS DIM`` connects, prints the monotonic time it will start
firing at, fires, and prints JSON lists ``sent`` (seconds after that start), ``latency`` (seconds;
-1 for an error) and ``burst`` (1 when the burst endpoint answered).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen import pinned  # noqa: E402  (benchmarks/, the script's own folder)

from edgectl.agent.codecs import encode_request, response_parameters  # noqa: E402
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402


def start_trace(
    target: str, rate: float, seconds: float, dim: int, cpus: set[int] | None
) -> tuple[subprocess.Popen[str], float]:
    """Start the generator in a child process: (the process, the monotonic time it starts firing at).
    Read its result with ``read_trace``."""
    argv = [sys.executable, __file__, target, str(rate), str(seconds), str(dim)]
    proc = subprocess.Popen(pinned(argv, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the load generator did not start: {proc.communicate(timeout=30)[1][-2000:]}")
    return proc, float(line)


def read_trace(proc: subprocess.Popen[str]) -> dict[str, list[float]]:
    """Wait for the child and parse what it printed."""
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(err[-2000:])
    return dict(json.loads(out))


def trace(target: str, rate: float, seconds: float, dim: int) -> dict[str, list[float]]:
    """Connect, say when firing starts, then fire ``rate`` requests a second for ``seconds``."""
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    request = encode_request(
        "m", {"x": np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)}
    )
    stub.ModelInfer(request)  # connect before the clock starts
    start_at = time.monotonic() + 0.2
    print(repr(start_at), flush=True)
    n = int(rate * seconds)
    sent = [0.0] * n
    latency = [-1.0] * n
    burst = [0] * n
    left = [n]
    lock = threading.Lock()
    done = threading.Event()

    def finish(fut: grpc.Future, i: int) -> None:
        elapsed = time.monotonic() - start_at - sent[i]
        try:
            burst[i] = int(str(response_parameters(fut.result()).get("served_by", "")).startswith("burst"))
            latency[i] = elapsed
        except grpc.RpcError:
            pass
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    for i in range(n):
        delay = start_at + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.monotonic() - start_at
        stub.ModelInfer.future(request, timeout=30).add_done_callback(lambda f, i=i: finish(f, i))
    done.wait(90)
    return {"sent": sent, "latency": latency, "burst": [float(b) for b in burst]}


if __name__ == "__main__":
    t, r, s, d = sys.argv[1:5]
    print(json.dumps(trace(t, float(r), float(s), int(d))))
