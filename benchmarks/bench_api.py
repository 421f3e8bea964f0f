"""Control-plane API throughput under concurrent clients, on SQLite and on PostgreSQL.

Starts `edgectl control-plane serve` (insecure, its own process, its CPU read from /proc) over a
state store seeded with N devices, then C concurrent clients (spread over processes, so the
client side's GIL is not the bottleneck) call a mix for D seconds: 60% GetDevice, 20%
ListDevices (a page of 50), 20% LabelDevice (a write plus its audit row). Prints calls/s, p50/p99
latency and the control plane's CPU per call, per state store.

    python benchmarks/bench_api.py                    # 16 clients, 10 s, both stores
    python benchmarks/bench_api.py --quick            # 16 clients, 4 s
    python benchmarks/bench_api.py --stores postgresql --pool-sizes 1,16   # one connection vs the pool
PostgreSQL: EDGECTL_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test); a schema
of its own is made and dropped.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgectl.ports import free_port, wait_for_port  # noqa: E402

PG_URL = os.environ.get("EDGECTL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
EDGECTL = Path(sys.executable).parent / "edgectl"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seed(state_url: str, devices: int) -> None:
    from edgectl.control_plane.store import StateStore

    store = StateStore(state_url)
    with store.tx() as tx:
        tx.executemany(
            "INSERT INTO devices (id, created_at) VALUES (?, ?)",
            [(f"dev-{i:05d}", time.time()) for i in range(devices)],
        )
    store.close()


def client_proc(address: str, threads: int, seconds: float, devices: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """``threads`` clients in one process, each with its own channel; puts their latencies (s)."""
    import threading

    import grpc

    from edgectl.protos.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc

    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    start = threading.Barrier(threads)

    def run(n: int) -> None:
        rng = random.Random(n)
        with grpc.insecure_channel(address) as channel:
            stub = fleet_pb2_grpc.FleetServiceStub(channel)
            stub.GetDevice(fleet_pb2.GetDeviceRequest(id="dev-00000"), timeout=30)  # connect first
            start.wait()
            deadline = time.perf_counter() + seconds
            while (t0 := time.perf_counter()) < deadline:
                device = f"dev-{rng.randrange(devices):05d}"
                pick = rng.random()
                try:
                    if pick < 0.6:
                        stub.GetDevice(fleet_pb2.GetDeviceRequest(id=device), timeout=30)
                    elif pick < 0.8:
                        page = common_pb2.Page(page_size=50)
                        stub.ListDevices(fleet_pb2.ListDevicesRequest(page=page), timeout=30)
                    else:
                        label = fleet_pb2.LabelDeviceRequest(id=device, set={"bench": str(rng.randrange(9))})
                        stub.LabelDevice(label, timeout=30)
                except grpc.RpcError:
                    errors[n] += 1
                    continue
                latencies[n].append(time.perf_counter() - t0)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(([x for lat in latencies for x in lat], sum(errors)))


def measure(
    store: str, clients: int, procs: int, seconds: float, devices: int, work: Path, pool_size: int
) -> dict[str, float]:
    schema = ""
    if store == "sqlite":
        state_url = f"sqlite:///{work}/{store}.db"
    else:
        import psycopg

        schema = f"edgectl_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        state_url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    try:
        seed(state_url, devices)
        port = free_port()
        log = (work / f"cp-{store}.log").open("wb")
        proc = subprocess.Popen(
            [str(EDGECTL), "control-plane", "serve", "--insecure", "--listen", f"127.0.0.1:{port}",
             "--blobs", str(work / "blobs"), "--mqtt", "mqtt://127.0.0.1:1", "--log-level", "error",
             "--db-pool-size", str(pool_size)],
            env={**os.environ, "EDGECTL_STATE": state_url}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            if not wait_for_port("127.0.0.1", port, 60):
                raise SystemExit(
                    f"control plane did not start: {(work / f'cp-{store}.log').read_text()[-2000:]}"
                )
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
            workers = [ctx.Process(target=client_proc, args=(f"127.0.0.1:{port}", n, seconds, devices, out))
                       for n in per if n]  # fmt: skip
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            for w in workers:
                w.start()
            results = [out.get(timeout=seconds + 120) for _ in workers]
            wall, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
            for w in workers:
                w.join()
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()
    finally:
        if schema:
            import psycopg

            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
    lat = sorted(x for r in results for x in r[0])
    calls = len(lat)
    return {
        "calls_per_s": calls / seconds,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        "cpu_ms_per_call": cpu / calls * 1000,
        "errors": float(sum(r[1] for r in results)),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--procs", type=int, default=4, help="client processes the clients are spread over")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--pool-sizes", default="16", help="PostgreSQL pool sizes to compare, e.g. 1,16")
    parser.add_argument("--quick", action="store_true", help="4 s per store")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else args.seconds
    print(f"{args.clients} concurrent clients, {seconds:.0f} s, {args.devices} devices; "
          f"mix: 60% GetDevice, 20% ListDevices(50), 20% LabelDevice; host: {os.cpu_count()} CPUs")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgectl-bench-api-") as tmp:
        for store in args.stores.split(","):
            sizes = [int(n) for n in args.pool_sizes.split(",")] if store == "postgresql" else [1]
            for size in sizes:
                r = measure(store, args.clients, args.procs, seconds, args.devices, Path(tmp), size)
                name = f"{store} ({'one writer' if store == 'sqlite' else f'pool {size}'})"
                print(f"{name:>22}: {r['calls_per_s']:7.0f} calls/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:6.1f} ms  control-plane CPU {r['cpu_ms_per_call']:.2f} ms/call  "
                      f"errors {r['errors']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
