"""The fleet simulator: hundreds of real edgectl agents in a few processes.

Every simulated device is an ``edgectl.agent.Agent`` (its MQTT link, reconcile loop, fetcher,
verifier, local artifact store, ONNX Runtime load and smoke test), with its own MQTT connection,
its own enrollment credentials, its own data directory and its own gRPC connection for its
downloads. What a simulated device shares with the others in its process is only the Python
interpreter and the ONNX Runtime library. By default it does not serve KServe V2 (nothing would
call it); ``serve=True`` keeps the agent's V2 server too.

``AgentHost`` runs K agents in this process; ``FleetSimulator`` spreads N devices over worker
processes (``python -m edgectl.sim_worker SPEC.json``), which tests and benchmarks can kill and restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from edgectl.errors import EdgectlError
from edgectl.protos.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)
DEFAULT_PER_PROCESS = 100
# Fault injection for the clock-skew tests when libfaketime is not installed: the worker shifts
# the wall-clock reads the agent makes (datetime.now, protobuf timestamps); see edgectl.sim_worker.shift_clock.
CLOCK_OFFSET_ENV = "EDGECTL_SIM_CLOCK_OFFSET_S"
READY_SUFFIX = ".ready"


class SimError(EdgectlError):
    """A simulated device or worker could not start."""


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: its id, labels, one-time enrollment token, and broker override."""

    device_id: str
    labels: dict[str, str] = field(default_factory=dict)
    token: str = ""  # "" when already enrolled (credentials.json in its data dir) or not enrolling
    mqtt: str | None = None  # this device's broker URL (e.g. through a fault proxy); None: settings'
    control_plane: str | None = None  # this device's control-plane address; None: settings'


@dataclass(frozen=True)
class SimSettings:
    """What every simulated device of a fleet shares."""

    root: Path  # one data dir per device under root/devices/, logs under root/logs/
    control_plane: str
    mqtt: str | None = None  # None: the broker URL the credentials name
    trust: tuple[Path, ...] = ()  # extra trusted keys (enrollment hands the fleet's keys)
    profile: str = "x86-cpu-avx2"
    heartbeat_s: float = 30.0
    idle_report_s: float = (
        300.0  # the agent's --idle-report: how often a report that changes nothing is re-sent
    )
    transport: str = "auto"
    blob_urls: str = "https"  # the agent's --blob-urls: presigned chunk URLs (https | any | off)
    serve: bool = False
    min_free_disk_mib: int | None = None  # the agent's --min-free-disk-mib; None: its default
    bandwidth_bps: float | None = None  # each device's download limit (the agent's --max-bandwidth)
    # A secured fleet: the fleet CA. Devices then enroll themselves as any agent does (own key,
    # CSR, TLS to ``enroll_server``), and use TLS to the broker and mTLS to ``control_plane``.
    ca_file: Path | None = None
    enroll_server: str | None = None  # the control plane's TLS listener for people and enrollment

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, handed to each worker process."""
        d = asdict(self)
        d["root"], d["trust"] = str(self.root), [str(p) for p in self.trust]
        d["ca_file"] = str(self.ca_file) if self.ca_file else None
        return d

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> SimSettings:
        """The inverse of :meth:`to_dict`."""
        return cls(**{
            **obj, "root": Path(obj["root"]), "trust": tuple(Path(p) for p in obj["trust"]),
            "ca_file": Path(obj["ca_file"]) if obj.get("ca_file") else None,
        })  # fmt: skip

    def data_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id


def make_devices(n: int, prefix: str = "sim", labels: dict[str, str] | None = None) -> list[SimDevice]:
    """``n`` devices named ``prefix-00000``…, all with ``labels``."""
    return [SimDevice(f"{prefix}-{i:05d}", dict(labels or {})) for i in range(n)]


def issue_tokens(
    control_plane: str, devices: Sequence[SimDevice], credentials: Any = None, timeout: float = 30.0
) -> list[SimDevice]:
    """The operator's half of enrollment: one one-time token per device (labels travel with it).

    ``credentials``: an ``edgectl.client.ClientCredentials`` (operator token, fleet CA) for a
    secured control plane; None for one in insecure dev mode."""
    from edgectl.client import ClientCredentials, ControlPlaneClient

    out = []
    with ControlPlaneClient(control_plane, timeout, credentials or ClientCredentials()) as client:
        for d in devices:
            request = fleet_pb2.CreateEnrollmentTokenRequest(device_id=d.device_id, labels=d.labels)
            out.append(replace(d, token=client.call(client.fleet.CreateEnrollmentToken, request).token))
    return out


def enroll_plaintext(control_plane: str, device: SimDevice, data_dir: Path, timeout: float = 30.0) -> None:
    """A device's half of enrollment with a control plane in insecure dev mode (no TLS, no CSR),
    where the agent's own enrollment, which insists on TLS, cannot go: the token is exchanged the
    same way and the credentials are stored 0600 where the agent reads them."""
    from edgectl.agent.config import CREDENTIALS_FILE
    from edgectl.security.files import write_private

    with grpc.insecure_channel(control_plane) as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        request = fleet_pb2.EnrollRequest(device_id=device.device_id, token=device.token)
        try:
            creds = stub.Enroll(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise SimError(
                f"{device.device_id}: enrollment failed: {exc.code().name} {exc.details()}"
            ) from exc
    write_private(data_dir / CREDENTIALS_FILE, json_format.MessageToJson(creds).encode())


class AgentHost:
    """K real agents in this process, one per simulated device."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.agents: dict[str, Any] = {}  # device id -> edgectl.agent.agent.Agent
        self._lock = threading.Lock()

    def config_for(self, device: SimDevice, token: str | None = None) -> Any:
        """The agent's configuration for ``device`` (``token``: enroll on start, secured fleets)."""
        from edgectl.agent.config import AgentConfig

        s = self.settings
        values: dict[str, Any] = dict(
            device_id=device.device_id, mqtt=device.mqtt or s.mqtt,
            control_plane=device.control_plane or s.control_plane, data_dir=s.data_dir(device.device_id),
            listen="127.0.0.1:0", labels=dict(device.labels), trust=s.trust, profile=s.profile,
            heartbeat_s=s.heartbeat_s, idle_report_s=s.idle_report_s, transport=s.transport, bandwidth_limit=s.bandwidth_bps,
            blob_urls=s.blob_urls, intra_op_threads=1,  # hundreds of sessions in a process: one thread each
        )  # fmt: skip
        if s.min_free_disk_mib is not None:
            values["min_free_disk_mib"] = s.min_free_disk_mib
        if s.ca_file is not None:
            values.update(ca_file=s.ca_file, enroll_server=s.enroll_server, enroll_token=token)
        return AgentConfig(**values).validate()

    def start(self, device: SimDevice) -> Any:
        """Enroll the device when it has a token and no credentials yet, then start its agent."""
        from edgectl.agent.agent import Agent
        from edgectl.agent.config import CREDENTIALS_FILE

        data_dir = self.settings.data_dir(device.device_id)
        token = device.token if device.token and not (data_dir / CREDENTIALS_FILE).exists() else None
        if token and self.settings.ca_file is None:
            enroll_plaintext(self.settings.control_plane, device, data_dir)
        # A secured fleet's agent enrolls itself here. grpc shares one connection between channels
        # to the same target within a process; a real device has its own, so each simulated one
        # gets a local subchannel pool.
        agent = Agent(
            self.config_for(device, token),
            serve=self.settings.serve,
            grpc_options=[("grpc.use_local_subchannel_pool", 1)],
        )
        agent.start()
        with self._lock:
            self.agents[device.device_id] = agent
        return agent

    def stop(self, device_id: str) -> None:
        """Stop one agent cleanly (it says offline, as a shut-down device does)."""
        with self._lock:
            agent = self.agents.pop(device_id)
        agent.stop()

    def close(self) -> None:
        """Stop every agent, in parallel (each waits up to a second for its loop to notice)."""
        with self._lock:
            agents, self.agents = list(self.agents.values()), {}

        def stop(agent: Any) -> None:
            with contextlib.suppress(Exception):
                agent.stop()

        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(stop, agents))


# -- worker processes ------------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process hosting a slice of the simulated fleet."""

    index: int
    spec: Path
    log: Path
    devices: list[SimDevice]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ready_file(self) -> Path:
        return self.spec.with_name(self.spec.name + READY_SUFFIX)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class FleetSimulator:
    """N simulated devices over worker processes of ``per_process`` agents each."""

    def __init__(
        self, settings: SimSettings, devices: Sequence[SimDevice], per_process: int = DEFAULT_PER_PROCESS
    ) -> None:
        if per_process < 1:
            raise SimError("--per-process must be at least 1")
        self.settings = settings
        self.devices = list(devices)
        (settings.root / "logs").mkdir(parents=True, exist_ok=True)
        (settings.root / "workers").mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []
        for i in range(0, len(self.devices), per_process):
            n = len(self.workers)
            self.workers.append(
                Worker(
                    n,
                    settings.root / "workers" / f"worker-{n}.json",
                    settings.root / "logs" / f"worker-{n}.log",
                    self.devices[i : i + per_process],
                )
            )

    def worker_of(self, device_id: str) -> Worker:
        return next(w for w in self.workers if any(d.device_id == device_id for d in w.devices))

    def start(self, timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
        """Start every worker and return once all of their agents run."""
        for w in self.workers:
            self.start_worker(w, env, wait=False)
        for w in self.workers:
            self.wait_ready(w, timeout)

    def start_worker(
        self, worker: Worker, env: dict[str, str] | None = None, wait: bool = True, timeout: float = 300.0
    ) -> None:
        """(Re)start one worker; ``env`` adds variables (a crash point, a clock offset, LD_PRELOAD)."""
        if worker.alive():
            raise SimError(f"worker {worker.index} already runs")
        spec = {"settings": self.settings.to_dict(), "devices": [asdict(d) for d in worker.devices]}
        worker.spec.write_text(json.dumps(spec))
        worker.ready_file.unlink(missing_ok=True)
        full_env = {**os.environ, **(env or {})}
        with worker.log.open("ab") as out:
            worker.proc = subprocess.Popen(
                [sys.executable, "-m", "edgectl.sim_worker", str(worker.spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        if wait:
            self.wait_ready(worker, timeout)

    def wait_ready(self, worker: Worker, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not worker.ready_file.exists():
            if not worker.alive():
                raise SimError(f"worker {worker.index} exited; its log ends:\n{_tail(worker.log)}")
            if time.monotonic() > deadline:
                raise SimError(f"worker {worker.index} not ready after {timeout:.0f} s:\n{_tail(worker.log)}")
            time.sleep(0.05)

    def kill(self, worker: Worker) -> None:
        """SIGKILL a worker: every device it hosts loses power at once."""
        if worker.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            worker.proc.wait()

    def stop_worker(self, worker: Worker, grace: float = 20.0) -> None:
        """SIGTERM one worker: its agents stop cleanly (each says offline)."""
        if worker.alive():
            assert worker.proc is not None
            worker.proc.terminate()
            try:
                worker.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(worker)

    def wait_exit(self, worker: Worker, timeout: float = 60.0) -> int:
        assert worker.proc is not None
        return worker.proc.wait(timeout)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every worker (agents stop cleanly), SIGKILL what lingers."""
        for w in self.workers:
            if w.alive():
                assert w.proc is not None
                w.proc.terminate()
        deadline = time.monotonic() + grace
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(w)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.alive()]

    def __enter__(self) -> FleetSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
