"""Rollout to a simulated fleet over real MQTT: time to all-reported, control-plane CPU, messages per device.

Starts a throwaway mosquitto, the control plane as its own process (so its CPU is measured
alone, from /proc), and N simulated devices with one real MQTT connection each, spread over
child processes of --per-process devices (benchmarks/thin_fleet.py: no process holds more than
its open-file limit), then rolls v2 out in waves 1,10%,50%,100% and prints the numbers, with the
broker's memory (mosquitto's RSS, from /proc); then every device re-reports once, as a heartbeat
does, and the control plane's CPU for that round is printed (the steady-state cost). On
PostgreSQL it also prints the rows written (pg_stat_database: give it a database of its own).

    python benchmarks/bench_rollout.py              # 1000 devices
    python benchmarks/bench_rollout.py --devices 10000
    python benchmarks/bench_rollout.py --quick      # 100 devices
    python benchmarks/bench_rollout.py --devices 2000 --state postgresql://postgres@127.0.0.1/test
    python benchmarks/bench_rollout.py --secure     # the broker `edgectl broker config` writes (TLS,
                                                    # per-device identities), the control plane secured
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.control_plane.sim_device

from benchmarks.thin_fleet import DEFAULT_PER_PROCESS, ThinFleet  # noqa: E402
from edgectl.artifact import SigningKey, TensorSpec, build_artifact, public_pem  # noqa: E402
from edgectl.broker import BrokerConfig, MosquittoProcess  # noqa: E402
from edgectl.client import ClientCredentials, ControlPlaneClient, push_artifact  # noqa: E402
from edgectl.ports import free_port, wait_for_port  # noqa: E402
from edgectl.protos.v1 import common_pb2, fleet_pb2, rollouts_pb2  # noqa: E402
from edgectl.security.broker_files import BrokerLayout, write_broker_files  # noqa: E402
from edgectl.security.dynsec import DynsecAdmin  # noqa: E402
from edgectl.security.tokens import Role, TokenIssuer  # noqa: E402
from tests.control_plane.sim_device import wait_for  # noqa: E402
from tests.harness.mqtt import MqttTestClient  # noqa: E402

# A PostgreSQL 15 backend publishes its counters within 10 s of going idle (PGSTAT_IDLE_INTERVAL).
PG_STATS_FLUSH_S = 11.0


def raise_open_files(needed: int) -> int:
    """Lift the soft RLIMIT_NOFILE toward the hard limit: every device is a socket here and in mosquitto."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(needed, 65536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise SystemExit(f"need {needed} open files but the hard limit is {hard}; raise it (ulimit -Hn)")
    return target


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> tuple[float, float]:
    """A live process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def wait_idle(pid: int, quiet: float = 0.05, timeout: float = 120.0) -> float:
    """Wait until ``pid`` uses under ``quiet`` s of CPU in a second; return its CPU seconds then."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - last < quiet:
            return now
        last = now
    raise SystemExit(f"process {pid} still busy after {timeout:.0f} s")


def pg_writes(url: str) -> tuple[int, int]:
    """Commits and rows written (inserted + updated + deleted) so far in ``url``'s database.

    PostgreSQL's own counters (pg_stat_database), so they count every client of that database:
    give the benchmark a database nobody else writes to."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def build(out: Path, key: SigningKey, version: int) -> Path:
    src = out / f"src-{version}.onnx"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(np.random.default_rng(version).bytes(256 * 1024))
    art = build_artifact(
        out / f"digits-{version}", name="digits", version=version, files={"model.onnx": src},
        input_signature=[TensorSpec("x", "float32", ("batch", 4))],
        output_signature=[TensorSpec("y", "float32", ("batch", 2))],
        golden_inputs={"x": np.ones((1, 4), np.float32)}, golden_outputs={"y": np.zeros((1, 2), np.float32)},
        recipe={}, target_profile="x86-cpu-avx2", metrics={}, precision_map={}, source_model_sha256="ab" * 32,
        signing_key=key,
    )  # fmt: skip
    return art.root


def provision(layout: BrokerLayout, ids: list[str]) -> dict[str, str]:
    """Each device's own broker identity through the dynamic-security API, as enrollment makes it."""
    admin_client = MqttTestClient("127.0.0.1", layout.port, username=layout.control_plane_username,
                                  password=layout.control_plane_password, tls_ca=str(layout.ca_cert))  # fmt: skip
    if admin_client.connect().is_failure:
        raise SystemExit("the broker refused the control plane's admin credentials")
    admin = DynsecAdmin(admin_client.client, timeout=30)
    try:
        return {i: admin.provision_device(i).password for i in ids}
    finally:
        admin_client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="100 devices")
    parser.add_argument("--per-process", type=int, default=DEFAULT_PER_PROCESS,
                        help="simulated devices per child process")  # fmt: skip
    parser.add_argument("--state", default="", help="state URL (default: SQLite in a temp dir)")
    parser.add_argument(
        "--secure", action="store_true", help="TLS broker with per-device identities, secured CP"
    )
    args = parser.parse_args()
    n = 100 if args.quick else args.devices
    if n < 1 or args.per_process < 1:
        raise SystemExit("--devices and --per-process must be at least 1")
    # Mosquitto inherits this limit and holds one socket per device; the devices' own sockets
    # live in the child processes, --per-process each.
    raise_open_files(max(n, args.per_process) + 256)
    work = Path(tempfile.mkdtemp(prefix="edgectl-bench-"))
    ids = [f"bench-{i:05d}" for i in range(n)]
    passwords: dict[str, str] = {}
    port = free_port()
    if args.secure:
        layout = write_broker_files(work / "fleet", hostnames=["localhost", "127.0.0.1"], host="127.0.0.1",
                                    port=free_port())  # fmt: skip
        base = layout.broker_config(work / "broker")
        broker = MosquittoProcess(
            dataclasses.replace(base, extra_lines=[*base.extra_lines, "max_connections -1"])
        )
        token = TokenIssuer.load_or_create(layout.directory / "token.key").issue("bench", Role.ADMIN)
        credentials = ClientCredentials(token=token, ca_pem=layout.ca_cert.read_bytes())
        mode = ["--security-dir", str(layout.directory), "--device-listen", f"127.0.0.1:{free_port()}"]
    else:
        broker = MosquittoProcess(BrokerConfig(data_dir=work / "broker", extra_lines=["max_connections -1"]))
        credentials = ClientCredentials()
        mode = ["--insecure", "--mqtt", broker.url]
    broker.start()
    if args.secure:
        t = time.monotonic()
        try:
            passwords = provision(layout, ids)
        except BaseException:  # Ctrl-C included: mosquitto would outlive the benchmark
            broker.stop()
            raise
        print(f"  ({n} broker identities provisioned in {time.monotonic() - t:.1f} s, not counted below)")
    key = SigningKey.generate()
    (work / "trusted.pem").write_bytes(public_pem(key.public_key))
    state = args.state or f"sqlite:///{work}/cp.db"
    log = (work / "cp.log").open("wb")
    cp = subprocess.Popen(
        [sys.executable, "-m", "edgectl.control_plane", "serve", *mode, "--listen", f"127.0.0.1:{port}",
         "--state", state, "--blobs", str(work / "blobs"),
         "--trust", str(work / "trusted.pem"), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    sim: ThinFleet | None = None
    try:
        if not wait_for_port("127.0.0.1", port, 30):
            raise SystemExit((work / "cp.log").read_text())
        client = ControlPlaneClient(f"127.0.0.1:{port}", timeout=60, credentials=credentials)
        old = push_artifact(client, build(work, key, 1)).artifact.ref
        new = push_artifact(client, build(work, key, 2)).artifact.ref
        broker_idle, _ = memory_mib(broker.pid)
        started = time.monotonic()
        sim = ThinFleet(
            work, broker.host, broker.port, ids, {"fleet": "bench"},
            {"digits": {"digest": old.digest, "version": old.version}}, passwords=passwords,
            tls_ca=str(layout.ca_cert) if args.secure else None, per_process=args.per_process,
        )  # fmt: skip
        sim.connect(timeout=300)

        def online() -> int:  # a page holds at most 1,000 devices: list_all follows next_page_token
            devices = client.list_all(client.fleet.ListDevices, fleet_pb2.ListDevicesRequest(), "devices")
            return sum(1 for d in devices if d.online)  # a reused database lists last run's devices too

        wait_for(lambda: online() == n, 300, interval=2.0, what=f"{n} devices online in the inventory")
        connect_s = time.monotonic() - started
        broker_connected, _ = memory_mib(broker.pid)
        on_postgres = state.startswith(("postgresql://", "postgres://"))
        if on_postgres:
            time.sleep(PG_STATS_FLUSH_S)  # let every backend publish what it has counted so far
            pg_before = pg_writes(state)
        before = sim.messages()
        cpu_before = cpu_seconds(cp.pid)  # after the wait above, so the rollout is not charged for it
        broker_cpu_before = cpu_seconds(broker.pid)
        devices_cpu_before = sum(cpu_seconds(p) for p in sim.pids())
        t0 = time.monotonic()
        rollout = client.rollouts.Create(
            rollouts_pb2.CreateRolloutRequest(
                artifact=f"digits:{new.version}",
                selector=common_pb2.Selector(match_labels={"fleet": "bench"}),
                strategy=rollouts_pb2.Strategy(waves=["1", "10%", "50%", "100%"], health_timeout_seconds=120),
            )
        )
        fleet = sim
        wait_for(lambda: fleet.count_digest("digits", new.digest) == n, 600, interval=0.2,
                 what="every device reporting the new digest")  # fmt: skip
        all_reported_s = time.monotonic() - t0
        for _ in client.rollouts.Watch(rollouts_pb2.WatchRolloutRequest(id=rollout.id), timeout=600):
            pass
        done_s = time.monotonic() - t0
        cpu = cpu_seconds(cp.pid) - cpu_before
        broker_cpu = cpu_seconds(broker.pid) - broker_cpu_before
        devices_cpu = sum(cpu_seconds(p) for p in sim.pids()) - devices_cpu_before
        final = client.rollouts.Get(rollouts_pb2.GetRolloutRequest(id=rollout.id))
        after = sim.messages()
        broker_now, broker_peak = memory_mib(broker.pid)
        if on_postgres:
            time.sleep(PG_STATS_FLUSH_S)
            pg_after = pg_writes(state)
        state_name = rollouts_pb2.RolloutState.Name(final.state)
        # One heartbeat round (an agent re-reports every 30 s by default): what steady state costs.
        beat_pg_before = pg_writes(state) if on_postgres else (0, 0)
        beat_cpu_before = cpu_seconds(cp.pid)
        t1 = time.monotonic()
        beats = sim.heartbeat()
        beat_cpu = wait_idle(cp.pid) - beat_cpu_before
        beat_s = time.monotonic() - t1
        if on_postgres:
            time.sleep(PG_STATS_FLUSH_S)
            beat_rows = pg_writes(state)[1] - beat_pg_before[1]
        how = "TLS, own broker identities, secured CP" if args.secure else "plaintext, --insecure CP"
        print(
            f"rollout of {n} simulated devices (real MQTT connections, {how}), waves 1,10%,50%,100%: {state_name}"
        )
        print(f"  connect + inventory:            {connect_s:8.2f} s")
        print(f"  Create -> all devices reported: {all_reported_s:8.2f} s")
        print(f"  Create -> rollout SUCCEEDED:    {done_s:8.2f} s")
        print(f"  control-plane CPU:              {cpu:8.2f} s  ({cpu * 1000 / n:.2f} ms per device)")
        print(f"  MQTT messages per device:       {(after - before) / n:8.2f}  (desired in + reported out)")
        print(
            f"  broker (mosquitto) RSS:         {broker_now:8.1f} MiB  (idle {broker_idle:.1f}, all connected "
            f"{broker_connected:.1f}, peak {broker_peak:.1f}; "
            f"{(broker_connected - broker_idle) * 1024 / n:.1f} KiB per connected device)"
        )
        print(
            f"  broker (mosquitto) CPU:         {broker_cpu:8.2f} s  ({broker_cpu * 1000 / n:.2f} ms per device)"
        )
        print(
            f"  device processes:               {len(sim.children):8d}  (at most {args.per_process} devices each; "
            f"{devices_cpu:.2f} s CPU in the rollout)"
        )
        print(
            f"  one heartbeat round:            {beat_cpu:8.2f} s  control-plane CPU for {beats} reports "
            f"({beat_cpu * 1000 / beats:.2f} ms each; absorbed in {beat_s:.1f} s)"
            + (f", {beat_rows / beats:.2f} rows written each" if on_postgres else "")
        )
        if on_postgres:
            commits, rows = pg_after[0] - pg_before[0], pg_after[1] - pg_before[1]
            print(
                f"  PostgreSQL writes:              {rows:8d} rows in {commits} commits  "
                f"({rows / n:.2f} rows per device; {rows / done_s:.0f} rows/s over the rollout)"
            )
        print(f"  host load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if final.state != rollouts_pb2.ROLLOUT_STATE_SUCCEEDED:
            raise SystemExit(f"rollout ended {state_name}: {final.reason}")
    finally:
        if sim is not None:
            sim.close()
        cp.terminate()
        try:
            cp.wait(15)
        except subprocess.TimeoutExpired:
            cp.kill()
        broker.stop()


if __name__ == "__main__":
    main()
