"""What the fleet's heartbeats cost the control plane, per report and per thread, with no rollout.

Real agents (``edgectl.sim`` workers, as in ``bench_fleet.py``) connect to a throwaway mosquitto
and the control plane (its own process), then only heartbeat; the control plane's CPU is read
per thread from /proc over a sample of ``--sample-s`` seconds. A short ``--heartbeat-s`` makes
many reports from few agents.

    python benchmarks/bench_heartbeats.py                  # 100 agents, a heartbeat every 2 s
    python benchmarks/bench_heartbeats.py --devices 500 --heartbeat-s 30 --per-process 125
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.harness
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_fleet import by_thread_kind, thread_cpu  # noqa: E402

from edgectl.artifact import SigningKey  # noqa: E402
from edgectl.broker import BrokerConfig, MosquittoProcess  # noqa: E402
from tests.harness.fleet import FleetRig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument("--per-process", type=int, default=100, help="agents per worker process")
    parser.add_argument("--sample-s", type=float, default=40.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgectl-bench-heartbeats-"))
    broker = MosquittoProcess(BrokerConfig(data_dir=work / "broker", extra_lines=["max_connections -1"]))
    broker.start()
    rig = FleetRig(work / "fleet", broker, SigningKey.generate(), log_level="warning")
    try:
        sim = rig.simulate(
            args.devices,
            labels={"fleet": "bench"},
            per_process=args.per_process,
            prefix="hb",
            heartbeat_s=args.heartbeat_s,
        )
        rig.wait_all_online([d.device_id for d in sim.devices], timeout=600)
        time.sleep(args.heartbeat_s + 5)  # past the first reports (each stored in full once)
        pid = rig.cp.proc.pid  # type: ignore[union-attr]
        before, t0, load0 = thread_cpu(pid), time.monotonic(), os.getloadavg()[0]
        time.sleep(args.sample_s)
        spent = by_thread_kind(before, thread_cpu(pid))
        dt = time.monotonic() - t0
        reports = args.devices * dt / args.heartbeat_s
        total = sum(spent.values())
        print(
            f"heartbeats: {args.devices} real agents, one report each per {args.heartbeat_s:g} s "
            f"({reports / dt:.1f} reports/s), load average {load0:.1f} / {os.getloadavg()[0]:.1f}"
        )
        print(f"  control-plane CPU: {total / dt * 1e3:.1f} ms/s, {total / reports * 1e3:.3f} ms per report")
        top = sorted(spent.items(), key=lambda kv: -kv[1])
        print(
            "  by thread (ms per report): "
            + ", ".join(f"{k} {v / reports * 1e3:.3f}" for k, v in top if v > 0)
        )
    finally:
        rig.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
