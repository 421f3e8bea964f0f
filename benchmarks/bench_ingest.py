"""What one device report costs the leader's MQTT ingest thread, piece by piece.

No broker and no agents: heartbeat reports (what a real agent sends every 30 s, one model, its
serving stats) are fed to ``FleetIngest.handle`` in batches, as the bus inbox would hand them,
against a real state store. Prints CPU per report (``time.thread_time``) for the decode alone and
for the whole handle at a few batch sizes, and with ``--profile`` the top of a cProfile.

    python benchmarks/bench_ingest.py                       # SQLite in a temp dir
    python benchmarks/bench_ingest.py --state postgresql://postgres@127.0.0.1:5432/DB
    python benchmarks/bench_ingest.py --profile --batch 1
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgectl.control_plane.bus import FleetBus, Inbound  # noqa: E402
from edgectl.control_plane.fleet import Fleet  # noqa: E402
from edgectl.control_plane.ingest import FleetIngest  # noqa: E402
from edgectl.control_plane.store import StateStore  # noqa: E402
from edgectl.mqtt.wire import DeviceTopics, decode, encode  # noqa: E402
from edgectl.protos.v1 import mqtt_pb2  # noqa: E402


def heartbeat(device_id: str, requests: int = 0) -> bytes:
    """A real agent's heartbeat as it leaves the device: one model, its stats, a fresh timestamp."""
    state = mqtt_pb2.ReportedState(
        device_id=device_id, observed_generation=3, agent_version="0.9.0", profile="x86-cpu-avx2",
        labels={"fleet": "bench", "site": "lab"}, health=1,
        stats=mqtt_pb2.ServingStats(requests=requests, error_rate=0.0, p99_ms=4.2, window_seconds=60),
    )  # fmt: skip
    state.models.add(
        name="classifier", digest="sha256:" + "ab" * 32, version=2, smoke_test_passed=True,
        previous_digest="sha256:" + "cd" * 32, execution_provider="CPUExecutionProvider",
    )  # fmt: skip
    state.reported_at.GetCurrentTime()
    return encode(state)


def per_report(ingest: FleetIngest, ids: list[str], batch: int, rounds: int, changing: bool) -> float:
    """CPU seconds per report over ``rounds`` heartbeat rounds of the whole fleet."""
    total, spent = 0, 0.0
    for r in range(-1, rounds):  # round -1 sets what the rounds compare with: not counted
        items = [
            Inbound(DeviceTopics(d).reported, heartbeat(d, requests=r + 1 if changing else 0)) for d in ids
        ]
        t0 = time.thread_time()  # the payloads are the devices' work: only the handling is counted
        for i in range(0, len(items), batch):
            ingest.handle(items[i : i + batch])
        ingest.flush_seen()  # the unchanged reports' last-seen times, written as the ingest loop would
        if r >= 0:
            spent += time.thread_time() - t0
            total += len(items)
    return spent / total


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--state", default="", help="a state URL (default: SQLite in a temp dir)")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1, 10, 100)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first batch size")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgectl-bench-ingest-"))
    store = StateStore(args.state or f"sqlite:///{work}/state.db")
    try:
        fleet = Fleet(store)
        wakes: list[int] = []
        ingest = FleetIngest(
            store,
            fleet,
            FleetBus("mqtt://127.0.0.1:1"),
            lambda ids: wakes.append(len(ids)),
            republish=lambda: 0,
        )
        ids = [f"bench-{i:05d}" for i in range(args.devices)]
        ingest.handle([Inbound(DeviceTopics(d).reported, heartbeat(d)) for d in ids])  # registers them
        payload = heartbeat(ids[0])
        t0 = time.thread_time()
        for _ in range(2000):
            decode(payload, mqtt_pb2.ReportedState)
        print(
            f"decode one report (proto3 JSON, {len(payload)} bytes): {(time.thread_time() - t0) / 2000 * 1e3:.3f} ms"
        )
        for batch in args.batch or [1, 10, 100]:
            for changing in (False, True):
                what = "stats change every round" if changing else "unchanged but for the timestamp"
                cost = per_report(ingest, ids, batch, args.rounds, changing)
                print(f"handle, batches of {batch:4d}, {what}: {cost * 1e3:.3f} ms per report")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            per_report(ingest, ids, (args.batch or [1])[0], args.rounds, False)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
