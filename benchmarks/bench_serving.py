"""Serving benchmarks for the V2 front-ends, printed as ratios measured side by side:

1. lone caller: a sequential client's ModelInfer round trip on a tiny model with batching on
   (defaults) vs off, and vs a bare ``ServerLive`` on the same channel (goals <= 1.1x, <= 1.3x),
   for a raw gRPC stub and for the stock ``tritonclient.grpc`` (``lone_client.py``);
2. protocols: HTTP (binary tensors) vs gRPC throughput on a >= 5 ms model with 4 concurrent
   clients (goal >= 0.9x), and each protocol's per-request overhead over a direct session;
3. bad input: an agent process's RSS growth for a 64 MiB request of the wrong dtype and a 60 MiB
   BYTES request (goal < 64 MiB), refused before decoding.

Load generators run in child processes (their own GIL). ``--quick`` shortens every section.
Run: python benchmarks/bench_serving.py [--quick] [--only lone|protocols|rss]
"""

from __future__ import annotations

import http.client
import json
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sections import direct_session, run_sections, timed  # noqa: E402  (benchmarks/, the script's own folder)

from edgectl.agent.batching import BatchSettings  # noqa: E402
from edgectl.agent.codecs import encode_request  # noqa: E402
from edgectl.artifact import SigningKey, public_pem  # noqa: E402
from edgectl.ports import free_port, wait_for_port  # noqa: E402
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from tests.agent.onnx_models import mlp_artifact, mlp_model  # noqa: E402
from tests.agent.v2_harness import InProcessV2  # noqa: E402

TINY_DIMS = (4, 8, 3)
# The lone caller's client: a script of its own, since tritonclient registers the same protobuf names as ours.
LONE_CLIENT = Path(__file__).with_name("lone_client.py")
MODEL_DIMS = (2048, 8192, 16)  # batch of 8 >= 5 ms single-threaded (see bench_agent.py)


def bench_lone(work: Path, quick: bool) -> None:
    """Sequential round trips from one client in a child process (its own GIL, as a real client):
    ServerLive, ModelInfer with batching off and ModelInfer with batching on (defaults), in blocks
    that take turns, so the host's drift hits all three alike; per-call medians. Both with a raw
    gRPC stub sending a prebuilt request and with the stock ``tritonclient.grpc`` client."""
    runs, blocks, n = (2, 10, 40) if quick else (3, 30, 60)
    tiny = mlp_model(work / "tiny.onnx", TINY_DIMS)
    on = InProcessV2(tiny, batch=BatchSettings())
    off = InProcessV2(tiny, batch=BatchSettings(max_batch_size=1))
    for client in ("stub", "tritonclient"):
        args = (on.server.address, off.server.address, str(blocks), str(n), str(TINY_DIMS[0]))
        got = [json.loads(_child_stdout(LONE_CLIENT, client, *args)) for _ in range(runs)]
        live = [g["live"] for g in got]
        on_live = [g["on"] / g["live"] for g in got]
        on_off = [g["on"] / g["off"] for g in got]
        print(
            f"lone sequential caller, {client} (child process), tiny MLP {TINY_DIMS}, {runs} runs of "
            f"{blocks} interleaved blocks x {n}: ServerLive {_span(live, 'us')}, ModelInfer "
            f"batching off {_span([g['off'] for g in got], 'us')}, on (max 8, 2 ms) "
            f"{_span([g['on'] for g in got], 'us')}; on/ServerLive {_span(on_live, 'x')} "
            f"(goal <= 1.3: {_met(max(on_live) <= 1.3)}), on/off {_span(on_off, 'x')} "
            f"(goal <= 1.1: {_met(max(on_off) <= 1.1)})"
        )
    on.close()
    off.close()


def _span(values: list[float], unit: str) -> str:
    """``a..b`` over runs: microseconds (``unit`` "us") or ratios (``unit`` "x")."""
    if unit == "us":
        return f"{min(values):.0f}..{max(values):.0f} us"
    return f"{min(values):.2f}..{max(values):.2f}{unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _child_load(proto: str, target: str, clients: int, total: int, dim: int, batch: int) -> float:
    """Requests per second from ``clients`` threads doing sequential requests (runs in a child)."""
    x = np.random.default_rng(0).standard_normal((batch, dim)).astype(np.float32)
    done = [0]
    lock = threading.Lock()
    if proto == "live":
        live_stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))

        def one() -> Callable[[], None]:
            return lambda: live_stub.ServerLive(pb.ServerLiveRequest(), timeout=60) and None

    elif proto == "grpc":
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = encode_request("m", {"x": x})

        def one() -> Callable[[], None]:
            return lambda: stub.ModelInfer(req, timeout=60) and None

    else:
        raw = x.tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            }
        ).encode()
        body = header + raw
        host, _, port = target.rpartition(":")

        def one() -> Callable[[], None]:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            headers = {
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            }

            def call() -> None:
                conn.request("POST", "/v2/models/m/infer", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")

            return call

    def worker() -> None:
        call = one()
        call()  # warm-up, not counted
        while True:
            with lock:
                if done[0] >= total:
                    return
                done[0] += 1
            call()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / (time.perf_counter() - start)


def _run_child_json(*args: str) -> dict[str, float]:
    return dict(json.loads(_child_stdout(*args)))


def _run_child(*args: str) -> float:
    return float(_child_stdout(__file__, "child", *args))


def _child_stdout(script: str | Path, *args: str) -> str:
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return out.stdout.strip()


def bench_protocols(work: Path, quick: bool) -> None:
    """HTTP binary vs gRPC throughput (4 clients, >= 5 ms model) and per-request overhead (tiny model)."""
    rounds, total = (2, 40) if quick else (5, 100)
    path = mlp_model(work / "tp.onnx", MODEL_DIMS)
    ratios, g_rps, h_rps = [], [], []
    for _ in range(rounds):
        served = InProcessV2(path, batch=BatchSettings(max_batch_size=1), http=True)
        assert served.http is not None
        g = _run_child("grpc", served.server.address, "4", str(total), str(MODEL_DIMS[0]), "8")
        h = _run_child("http", served.http.address, "4", str(total), str(MODEL_DIMS[0]), "8")
        served.close()
        g_rps.append(g)
        h_rps.append(h)
        ratios.append(h / g)
    ratio = statistics.median(ratios)
    print(
        f"HTTP binary vs gRPC, MLP {MODEL_DIMS} batch 8, 4 clients, {rounds} rounds of {total}: "
        f"{statistics.median(h_rps):.1f} vs {statistics.median(g_rps):.1f} req/s = {ratio:.2f}x "
        f"(rounds {min(ratios):.2f}..{max(ratios):.2f}; goal >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})"
    )
    tiny = mlp_model(work / "tiny.onnx", TINY_DIMS)
    xt = np.zeros((1, TINY_DIMS[0]), np.float32)
    direct = direct_session(tiny)
    served = InProcessV2(tiny, batch=BatchSettings(), http=True)
    assert served.http is not None
    n = 200 if quick else 500
    d = statistics.median(timed(lambda: direct.run(None, {"x": xt}), n) for _ in range(3))
    g = 1 / _run_child("grpc", served.server.address, "1", str(n), str(TINY_DIMS[0]), "1")
    h = 1 / _run_child("http", served.http.address, "1", str(n), str(TINY_DIMS[0]), "1")
    served.close()
    print(
        f"per-request overhead over a direct session, tiny MLP, one sequential client (child process): "
        f"gRPC {(g - d) * 1e6:.0f} us, HTTP {(h - d) * 1e6:.0f} us (direct run {d * 1e6:.0f} us)"
    )


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def bench_rss(work: Path, quick: bool) -> None:
    """An agent process (serve-only) gets a 64 MiB FP64 request for an FP32 model, and a 60 MiB
    BYTES one: with the default 64 MiB cap (refused by gRPC from the length prefix), and with the
    cap raised to 96 MiB so they are read and refused by the signature check."""
    key = SigningKey.generate()
    art = mlp_artifact(work / "rss-art", work / "models", key, name="m", dims=(4, 8, 3))
    (work / "rss.pub.pem").write_bytes(public_pem(key.public_key))
    for cap in ("64", "96"):
        _rss_run(work, art.root, cap)


def _rss_run(work: Path, model_dir: Path, cap_mib: str) -> None:
    port = free_port()
    cmd = [
        sys.executable, "-c", "from edgectl.cli.agent import app; app()", "run", "--serve-only",
        "--model-dir", str(model_dir), "--trust", str(work / "rss.pub.pem"), "--listen", f"127.0.0.1:{port}",
        "--profile", "x86-cpu-avx2", "--intra-op-threads", "1", "--max-request-mib", cap_mib, "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_port("127.0.0.1", port, 60):
            raise RuntimeError("the agent did not start")
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 128 << 20)]
        )
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(encode_request("m", {"x": np.zeros((1, 4), np.float32)}))  # warm
        wrong = pb.ModelInferRequest(model_name="m")
        wrong.inputs.add(name="x", datatype="FP64", shape=[(64 << 20) // 32, 4])
        wrong.raw_input_contents.append(bytes(64 << 20))
        count = (60 << 20) // 4
        strings = pb.ModelInferRequest(model_name="m")
        strings.inputs.add(name="x", datatype="BYTES", shape=[count // 4, 4])
        strings.raw_input_contents.append(struct.pack("<I", 0) * count)
        for label, req in (
            ("64 MiB wrong dtype (FP64 for FP32)", wrong),
            ("60 MiB BYTES (15.7 M empty elements)", strings),
        ):
            before = _rss_kib(proc.pid)
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
            try:
                stub.ModelInfer(req, timeout=60)
                outcome = "ACCEPTED"
            except grpc.RpcError as err:
                outcome = f"{err.code().name}: {(err.details() or '')[:70]}"
            time.sleep(0.5)
            after, peak = _rss_kib(proc.pid), _rss_kib(proc.pid, "VmHWM")
            growth = (after - before) / 1024
            ok = stub.ModelInfer(encode_request("m", {"x": np.zeros((1, 4), np.float32)})) is not None
            print(
                f"bad input, cap {cap_mib} MiB, {label}: {outcome}; agent RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB "
                f"(growth {growth:.1f} MiB; goal < 64: {'met' if growth < 64 else 'MISSED'}), peak during the "
                f"request {peak / 1024:.0f} MiB (gRPC holds the received message); still serving: {ok}"
            )
        channel.close()
    finally:
        proc.terminate()
        proc.wait(10)


SECTIONS: dict[str, Callable[[Path, bool], None]] = {
    "lone": bench_lone,
    "protocols": bench_protocols,
    "rss": bench_rss,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        proto, target, clients, total, dim, batch = sys.argv[2:8]
        print(_child_load(proto, target, int(clients), int(total), int(dim), int(batch)))
        return
    run_sections(__doc__.splitlines()[0], SECTIONS, "bench-serving-")


if __name__ == "__main__":
    main()
