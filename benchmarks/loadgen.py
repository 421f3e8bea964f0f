"""KServe V2 load generators for the agent benchmarks, each run in a child process of its own.

A child process does not share the benchmark's GIL with the server under test, and its async
stubs keep many requests in flight without a thread per client. ``run_load`` starts one and
reads the JSON it prints:

- ``closed TARGET CLIENTS TOTAL DIM BATCH``: keep CLIENTS requests in flight until TOTAL finish;
  prints the request rate.
- ``open TARGET RATE SECONDS SLO_S DIM``: fire RATE requests a second for SECONDS whatever the
  answers; prints the share within the SLO, errors, and the share served by the burst endpoint.
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

from edgectl.agent.codecs import encode_request, response_parameters  # noqa: E402
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402


def pinned(argv: list[str], cpus: set[int] | None) -> list[str]:
    """``argv`` (a Python command) run pinned to ``cpus``: a trampoline sets the affinity, then execs
    (no preexec_fn: forking a process that runs gRPC threads is not safe)."""
    if cpus is None:
        return argv
    trampoline = (
        f"import os, sys; os.sched_setaffinity(0, {sorted(cpus)}); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", trampoline, *argv]


def run_load(args: list[str], cpus: set[int] | None = None) -> dict[str, float]:
    """Run the load generator in a child process, so it does not share our GIL, and read its JSON."""
    out = subprocess.run(
        pinned([sys.executable, __file__, *args], cpus),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return dict(json.loads(out.stdout))


def closed_loop(target: str, clients: int, total: int, dim: int, batch: int) -> dict[str, float]:
    """Keep ``clients`` requests in flight (async stubs, no thread per client) until ``total`` finish."""
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    requests = [
        encode_request("m", {"x": np.random.default_rng(i).standard_normal((batch, dim)).astype(np.float32)})
        for i in range(min(total, 64))
    ]
    stub.ModelInfer(requests[0])  # warm-up
    lock = threading.Lock()
    done = threading.Event()
    state = {"issued": 0, "finished": 0, "errors": 0}

    def issue() -> None:
        with lock:
            if state["issued"] >= total:
                return
            i = state["issued"]
            state["issued"] += 1
        stub.ModelInfer.future(requests[i % len(requests)], timeout=60).add_done_callback(finish)

    def finish(fut: grpc.Future) -> None:
        if fut.exception() is not None:
            state["errors"] += 1
        with lock:
            state["finished"] += 1
            if state["finished"] == total:
                done.set()
        issue()

    start = time.perf_counter()
    for _ in range(clients):
        issue()
    done.wait(240)
    elapsed = time.perf_counter() - start
    if state["errors"]:
        raise RuntimeError(f"{state['errors']} of {total} requests failed")
    return {"rps": total / elapsed}


def open_loop(target: str, rate: float, seconds: float, slo_s: float, dim: int) -> dict[str, float]:
    """Fire requests at ``rate``/s for ``seconds`` (open loop): share within SLO, errors, burst share."""
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    request = encode_request(
        "m", {"x": np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)}
    )
    stub.ModelInfer(request)
    lat: dict[str, list[float]] = {"local": [], "burst": []}
    errors = [0]
    lock = threading.Lock()
    n = int(rate * seconds)
    done = threading.Event()

    def finish(fut: grpc.Future, t0: float) -> None:
        elapsed = time.perf_counter() - t0
        try:
            where = str(response_parameters(fut.result()).get("served_by", ""))
            route = "burst" if where.startswith("burst") else "local"
        except grpc.RpcError:
            route = ""
        with lock:
            if route:
                lat[route].append(elapsed)
            else:
                errors[0] += 1
            if len(lat["local"]) + len(lat["burst"]) + errors[0] == n:
                done.set()

    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        fut = stub.ModelInfer.future(request, timeout=30)
        fut.add_done_callback(lambda f, t0=t0: finish(f, t0))
    done.wait(90)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    everything = lat["local"] + lat["burst"]
    return {
        "within": sum(1 for v in everything if v <= slo_s) / n,
        "errors": errors[0],
        "burst": len(lat["burst"]) / n,
        "p99_local": pct(lat["local"], 0.99),
        "p99_burst": pct(lat["burst"], 0.99),
        "p50_burst": pct(lat["burst"], 0.5),
    }


def main(argv: list[str]) -> None:
    mode, target, *rest = argv
    if mode == "closed":
        print(json.dumps(closed_loop(target, int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))))
    elif mode == "open":
        print(json.dumps(open_loop(target, float(rest[0]), float(rest[1]), float(rest[2]), int(rest[3]))))
    else:
        raise SystemExit(f"unknown mode {mode!r}: closed or open")


if __name__ == "__main__":
    main(sys.argv[1:])
