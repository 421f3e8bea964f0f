"""End to end: a 5 MB artifact rolled out to 500 simulated devices that are real agents.

Starts a throwaway mosquitto, the control plane as its own process (its CPU read from /proc),
and N real ``edgectl.agent`` instances in a few worker processes (``edgectl.sim``): each has its
own MQTT connection, enrollment credentials, data dir and gRPC connection, and really fetches,
verifies, loads and smoke-tests the model. Rolls the artifact out in waves 1,10%,50%,100% and
prints the wall time, bytes on the wire per device (from the kernel's per-socket counters), the
control plane's CPU seconds, and the ratio to copying the same bytes over loopback (the limit).

    python benchmarks/bench_fleet.py              # 500 devices, 5 MB
    python benchmarks/bench_fleet.py --quick      # 50 devices, 5 MB
    python benchmarks/bench_fleet.py --devices 200 --size-mb 2 --per-process 50
    python benchmarks/bench_fleet.py --quick --blobs s3   # blobs in S3 (moto's server): agents GET
                                                          # chunks by presigned URL, not through gRPC

With ``--blobs s3`` the bucket is moto's S3 server in this process, reached by the agents through
a counting TCP proxy (the URLs are signed for it), so the bytes each device pulled from the blob
store are counted as well as what it exchanged with the control plane.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.harness

from edgectl.artifact import SigningKey  # noqa: E402
from edgectl.broker import BrokerConfig, MosquittoProcess  # noqa: E402
from edgectl.protos.v1 import rollouts_pb2  # noqa: E402
from tests.faults.proxy import TcpProxy  # noqa: E402
from tests.harness.fleet import FleetRig, sized_artifact, wait_for  # noqa: E402


class S3Site:
    """moto's S3 server on a free port, one bucket, and the counting proxy devices reach it through."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per GET otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.proxy = TcpProxy(host, port)
        os.environ.update({
            "EDGECTL_S3_ENDPOINT": f"http://{host}:{port}", "EDGECTL_S3_PUBLIC_ENDPOINT": f"http://{self.proxy.address}",
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        })  # fmt: skip
        import boto3

        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
        self.url = "s3://bench/fleet"

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()


class MessageCounter:
    """Counts the fleet's MQTT messages by kind (the last topic level: reported, events, desired,
    status) off the broker, as a second subscriber: what the control plane receives and sends."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.counts: collections.Counter[str] = collections.Counter()
        self.counting = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-counter", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe("edgectl/v1/devices/+/+", qos=0)  # not retained replays: see _on_message
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: Any) -> None:
        if self.counting and not msg.retain:
            self.counts[msg.topic.rsplit("/", 1)[1]] += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id -> (its OS name, user + system CPU seconds) of a live process, from /proc."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def by_thread_kind(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two ``thread_cpu`` samples, by kind of thread: the control plane
    names its own (``grpc_3`` -> ``grpc``); gRPC's C-core names its; the rest keep the process's name."""
    spent: collections.Counter[str] = collections.Counter()
    for tid, (name, cpu) in after.items():
        kind = re.sub(r"[_-]?\d+$", "", name) or name
        spent[kind] += cpu - before.get(tid, (name, 0.0))[1]
    return dict(spent)


def socket_bytes(port: int) -> tuple[int, int, int]:
    """(connections, bytes sent, bytes received) summed over established TCP sockets on local ``port``."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sent = sum(int(x) for x in re.findall(r"bytes_sent:(\d+)", out))
    received = sum(int(x) for x in re.findall(r"bytes_received:(\d+)", out))
    return len(re.findall(r"bytes_sent:", out)), sent, received


def worker_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loopback_copy_seconds(total: int, per_copy: int) -> float:
    """Seconds to push ``total`` bytes through one loopback TCP connection (a reader thread drains)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def drain() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                received[0] += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    block = os.urandom(per_copy)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as out:
        for _ in range(total // per_copy):
            out.sendall(block)
    reader.join()
    elapsed = time.perf_counter() - t0
    server.close()
    assert received[0] == total // per_copy * per_copy
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--per-process", type=int, default=125, help="agents per worker process")
    parser.add_argument("--quick", action="store_true", help="50 devices")
    parser.add_argument(
        "--blobs", choices=["local", "s3"], default="local", help="the control plane's blob store"
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=30.0,
        help="seconds the idle rate is sampled before the rollout: one heartbeat period (30 s) sees every "
        "device's heartbeat once, a shorter sample a varying share of them",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) on SIGTERM too
    n = 50 if args.quick else args.devices
    size = int(args.size_mb * 1e6)
    work = Path(tempfile.mkdtemp(prefix="edgectl-bench-fleet-"))
    broker = MosquittoProcess(BrokerConfig(data_dir=work / "broker", extra_lines=["max_connections -1"]))
    broker.start()
    s3 = S3Site() if args.blobs == "s3" else None
    rig = FleetRig(
        work / "fleet", broker, SigningKey.generate(), log_level="warning", blobs=s3.url if s3 else None
    )
    try:
        art = sized_artifact(work, rig.key, 1, size)
        artifact_bytes = sum(f.size for f in art.manifest.files)
        digest = rig.push(art)
        t0 = time.monotonic()
        sim = rig.simulate(
            n,
            labels={"fleet": "bench"},
            per_process=args.per_process,
            prefix="bench",
            heartbeat_s=30.0,
            blob_urls="any",  # moto serves plain HTTP; with a local store the agents fall back to gRPC
        )
        ids = [d.device_id for d in sim.devices]
        rig.wait_all_online(ids, timeout=600)
        start_s = time.monotonic() - t0
        _, grpc_sent0, grpc_recv0 = socket_bytes(rig.cp.port)
        _, mqtt_sent0, mqtt_recv0 = socket_bytes(broker.port)
        # The idle rate first (ticks, election, heartbeats), so that what the rollout itself costs
        # per device can be told from what the control plane spends anyway over the wall time.
        idle0, idle_t0 = cpu_seconds(rig.cp.proc.pid), time.monotonic()  # type: ignore[union-attr]
        idle_threads0 = thread_cpu(rig.cp.proc.pid)  # type: ignore[union-attr]
        time.sleep(args.idle_s)
        idle_dt = time.monotonic() - idle_t0
        idle_rate = (cpu_seconds(rig.cp.proc.pid) - idle0) / idle_dt  # type: ignore[union-attr]
        idle_threads = by_thread_kind(idle_threads0, thread_cpu(rig.cp.proc.pid))  # type: ignore[union-attr]
        counter = MessageCounter(broker.host, broker.port)
        time.sleep(0.5)  # subscribed before the rollout starts
        counter.counting = True
        cpu0 = cpu_seconds(rig.cp.proc.pid)  # type: ignore[union-attr]
        threads0 = thread_cpu(rig.cp.proc.pid)  # type: ignore[union-attr]
        load0 = os.getloadavg()[0]
        blob0 = s3.proxy.injected.downstream_bytes if s3 else 0
        t1 = time.monotonic()
        rollout = rig.rollout(f"{art.manifest.name}:{art.manifest.version}", {"fleet": "bench"},
                              ["1", "10%", "50%", "100%"], health_timeout_s=600)  # fmt: skip
        # Polled every 2 s, as a person watching would: each Get lists every device of the rollout,
        # and what the watcher costs is not what the rollout costs.
        final = rig.wait_done(rollout.id, timeout=1800, interval=2.0)
        wall = time.monotonic() - t1
        cpu = cpu_seconds(rig.cp.proc.pid) - cpu0  # type: ignore[union-attr]
        threads = by_thread_kind(threads0, thread_cpu(rig.cp.proc.pid))  # type: ignore[union-attr]
        load1 = os.getloadavg()[0]
        time.sleep(0.5)  # the last messages reach the counter
        counter.counting = False
        counter.close()
        sent = sum(v for k, v in counter.counts.items() if k != "desired")
        to_cp = counter.counts["reported"] + counter.counts["status"]  # events only with --device-events
        conns, grpc_sent, grpc_recv = socket_bytes(rig.cp.port)
        _, mqtt_sent, mqtt_recv = socket_bytes(broker.port)
        wait_for(lambda: sum(v == digest for v in rig.serving(art.manifest.name).values()) == n,
                 60, what="every device reporting the new digest")  # fmt: skip
        serving = sum(v == digest for v in rig.serving(art.manifest.name).values())
        rss = sum(worker_rss_mb(pid) for pid in sim.pids())
        copy_s = loopback_copy_seconds(n * artifact_bytes, artifact_bytes)
        grpc_per = (grpc_sent - grpc_sent0 + grpc_recv - grpc_recv0) / n
        mqtt_per = (mqtt_sent - mqtt_sent0 + mqtt_recv - mqtt_recv0) / n
        blob_per = ((s3.proxy.injected.downstream_bytes if s3 else 0) - blob0) / n
        state = rollouts_pb2.RolloutState.Name(final.state)
        workers = len(sim.workers)
        print(f"fleet rollout: {n} real agents in {workers} processes, artifact {artifact_bytes / 1e6:.2f} MB, "
              f"blobs {args.blobs}, waves 1,10%,50%,100%: {state} ({serving} serving)")  # fmt: skip
        print(f"  agents' memory (RSS, all workers): {rss:6.0f} MB  ({rss / n:.1f} MB per device)")
        print(f"  enroll + start + online:        {start_s:8.1f} s")
        print(f"  rollout wall time:              {wall:8.1f} s")
        print(
            f"  bytes on the wire per device:   {grpc_per / 1e6:8.2f} MB gRPC ({conns} connections to the "
            f"control plane) + {mqtt_per / 1e3:.1f} kB MQTT  ({grpc_per / artifact_bytes:.3f} x the artifact)"
        )
        if s3:
            print(f"  blob store -> device (presigned): {blob_per / 1e6:6.2f} MB per device  "
                  f"({blob_per / artifact_bytes:.3f} x the artifact; HTTP headers included)")  # fmt: skip
        kinds = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(counter.counts.items()) if k != "desired")
        print(f"  MQTT messages per device:       {sent / n:8.1f} sent ({kinds}); the control plane "
              f"received {to_cp / n:.1f} (reports, status) and sent {counter.counts['desired'] / n:.1f}")  # fmt: skip
        print(f"  control-plane CPU:              {cpu:8.2f} s  ({cpu / n * 1000:.2f} ms per device)")
        busy = cpu - idle_rate * wall
        print(f"  ... above its idle rate:        {busy:8.2f} s  ({busy / n * 1000:.2f} ms per device; "
              f"idle {idle_rate * 1000:.0f} ms/s)")  # fmt: skip
        top = sorted(threads.items(), key=lambda kv: -kv[1])
        print(
            "  ... by thread (ms per device):  "
            + ", ".join(f"{k} {v / n * 1000:.2f}" for k, v in top if v > 0)
        )
        idle_top = sorted(idle_threads.items(), key=lambda kv: -kv[1])
        print(
            "  idle rate by thread (ms/s):     "
            + ", ".join(f"{k} {v / idle_dt * 1000:.1f}" for k, v in idle_top if v > 0)
        )
        print(f"  load average (1 min) at the rollout's start / end: {load0:.1f} / {load1:.1f}")
        print(f"  loopback copy of {n} x {artifact_bytes / 1e6:.1f} MB:  {copy_s:8.2f} s  (the limit)")
        print(f"  rollout / loopback copy:        {wall / copy_s:8.1f} x")
        if final.state != rollouts_pb2.ROLLOUT_STATE_SUCCEEDED:
            raise SystemExit(f"rollout ended {state}: {final.reason}")
    finally:
        rig.close()
        broker.stop()
        if s3:
            s3.close()
        shutil.rmtree(work, ignore_errors=True)  # N data dirs with the artifact twice each


if __name__ == "__main__":
    main()
