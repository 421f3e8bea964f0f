"""The lone sequential caller of ``bench_serving.py``, run in a child process of its own.

``python lone_client.py stub|tritonclient ON OFF BLOCKS N [DIM]`` calls ServerLive on ON's channel
and ModelInfer (model ``m``, input ``x`` of 1 x DIM FP32, output ``y``; DIM 4 by default) on ON and OFF, in BLOCKS blocks of N calls that take
turns (each block rotates who goes first), and prints the per-call median microseconds of each
as JSON. tritonclient registers the same ``inference.*`` protobuf names as edgectl's protos, so
this script imports only the client it is asked for.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np


def stub_calls(on: str, off: str, dim: int) -> dict[str, Callable[[], object]]:
    """A raw gRPC stub sending one prebuilt request (the floor a client can reach)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgectl.agent.codecs import encode_request
    from edgectl.protos.inference import grpc_predict_v2_pb2 as pb
    from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    stub_on = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(on))
    stub_off = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(off))
    request = encode_request("m", {"x": np.zeros((1, dim), np.float32)}, outputs=["y"])
    live = pb.ServerLiveRequest()
    return {
        "live": lambda: stub_on.ServerLive(live, timeout=60),
        "on": lambda: stub_on.ModelInfer(request, timeout=60),
        "off": lambda: stub_off.ModelInfer(request, timeout=60),
    }


def tritonclient_calls(on: str, off: str, dim: int) -> dict[str, Callable[[], object]]:
    """The stock ``tritonclient.grpc`` client, as a Triton user calls it."""
    import tritonclient.grpc as tc

    client_on, client_off = tc.InferenceServerClient(on), tc.InferenceServerClient(off)
    tensor = tc.InferInput("x", [1, dim], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, dim), np.float32))
    wanted = [tc.InferRequestedOutput("y")]
    return {
        "live": lambda: client_on.is_server_live(),
        "on": lambda: client_on.infer("m", [tensor], outputs=wanted).as_numpy("y"),
        "off": lambda: client_off.infer("m", [tensor], outputs=wanted).as_numpy("y"),
    }


def measure(calls: dict[str, Callable[[], object]], blocks: int, n: int) -> dict[str, float]:
    """Per-call median microseconds of each call, from ``blocks`` blocks of ``n`` that take turns."""
    times: dict[str, list[int]] = {k: [] for k in calls}
    for fn in calls.values():
        for _ in range(20):  # warm-up, not counted
            fn()
    order = list(calls)
    for b in range(blocks):
        for kind in order[b % len(order) :] + order[: b % len(order)]:
            fn, out = calls[kind], times[kind]
            for _ in range(n):
                t0 = time.perf_counter_ns()
                fn()
                out.append(time.perf_counter_ns() - t0)
    return {k: statistics.median(v) / 1000 for k, v in times.items()}


def main() -> None:
    client, on, off, blocks, n = sys.argv[1:6]
    dim = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    calls = stub_calls(on, off, dim) if client == "stub" else tritonclient_calls(on, off, dim)
    print(json.dumps(measure(calls, int(blocks), int(n))))


if __name__ == "__main__":
    main()
