"""`edgectl up`: a whole fleet on one machine, as real processes on free ports.

A mosquitto, the control plane (SQLite + local blobs) and N agents, plus one more agent
labelled ``tier=cloud`` that the edge agents burst to: the cloud endpoint is deployed to like
any device. Where everything listens goes to ``endpoints.json`` in the data dir, which other
commands read when no flag or env names a server. Stopping is graceful (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgectl.artifact import default_key_path, default_signing_key
from edgectl.artifact.signing import public_key_path
from edgectl.broker import BrokerConfig, MosquittoProcess
from edgectl.client import ENROLL_TOKEN_ENV, ControlPlaneClient, resolve_credentials
from edgectl.endpoints import AgentEndpoint, Endpoints, LocalFleetError
from edgectl.labels import format_labels
from edgectl.ports import free_port, wait_for_port
from edgectl.protos.v1 import fleet_pb2
from edgectl.security.broker_files import BrokerLayout, write_broker_files
from edgectl.security.files import PRIVATE_UMASK, write_private
from edgectl.security.tokens import Role, TokenIssuer

STOP_GRACE_S = 10.0


def _edgectl(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgectl", *args]


class LocalFleet:
    """Starts and stops the processes of a single-box fleet."""

    def __init__(
        self,
        data_dir: Path,
        agents: int = 2,
        log: bool = True,
        trust: list[Path] | None = None,
        secure: bool = True,
    ) -> None:
        if agents < 0:
            raise LocalFleetError("--agents must be 0 or more")
        self.data_dir = data_dir.resolve()
        self.agent_count = agents
        self.trust = trust
        self.secure = secure
        self.layout: BrokerLayout | None = None
        self.broker: MosquittoProcess | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoints: Endpoints | None = None
        self._log = log

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a part; secrets travel in ``env`` (never argv, which any local user can read)."""
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **(env or {})},
                                    umask=PRIVATE_UMASK)  # fmt: skip
        self.children[name] = proc
        return proc

    def _await(self, name: str, host: str, port: int, timeout: float = 30.0) -> None:
        proc = self.children[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.data_dir / "logs" / f"{name}.log").read_text(errors="replace")[-1500:]
                raise LocalFleetError(f"{name} exited with code {proc.returncode}; its log ends:\n{tail}")
            if wait_for_port(host, port, timeout=0.2):
                return
        raise LocalFleetError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s",
                              hint=f"see {self.data_dir / 'logs' / (name + '.log')}")  # fmt: skip

    def start(self) -> Endpoints:
        """Start everything and return once every part listens."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            Endpoints.read(self.data_dir)
        except LocalFleetError:
            pass
        else:
            if _any_alive(Endpoints.read(self.data_dir)):
                raise LocalFleetError(
                    f"a local fleet already runs from {self.data_dir}", hint="run `edgectl down` first"
                )
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _trusted_dir(self) -> Path:
        """Copy the keys the fleet trusts into DATA_DIR/trusted (default: the user's default signing key).

        The control plane and every agent read the same directory, so an artifact that
        `edgectl compress` signed with the default key deploys with no key flags at all.
        """
        tdir = self.data_dir / "trusted"
        tdir.mkdir(parents=True, exist_ok=True)
        sources = self.trust
        if not sources:
            default_signing_key()  # made on first use, like ssh-keygen
            sources = [public_key_path(default_key_path())]
        for src in sources:
            if not src.is_file():
                raise LocalFleetError(
                    f"trusted key {src} does not exist", hint="pass a .pub.pem file to --trust"
                )
            (tdir / src.name).write_bytes(src.read_bytes())
        return tdir

    def _start(self) -> Endpoints:
        trusted = self._trusted_dir()
        cp_dir = self.data_dir / "control-plane"
        cp_dir.mkdir(parents=True, exist_ok=True)
        cp_port, device_port, console_port, metrics_port = free_port(), free_port(), free_port(), free_port()
        if self.secure:
            # The files `edgectl broker config` writes: fleet CA, TLS broker, dynamic-security identities.
            self.layout = write_broker_files(self.data_dir / "security", hostnames=["localhost", "127.0.0.1"],
                                             host="127.0.0.1", port=free_port())  # fmt: skip
            self.broker = MosquittoProcess(self.layout.broker_config(self.data_dir / "broker"))
            mode = [
                "--security-dir",
                str(self.layout.directory),
                "--device-listen",
                f"127.0.0.1:{device_port}",
            ]
        else:
            self.broker = MosquittoProcess(BrokerConfig(data_dir=self.data_dir / "broker"))
            mode = ["--insecure", "--mqtt", ""]
        self.broker.start()
        if not self.secure:
            mode[-1] = self.broker.url
        self._spawn("control-plane", _edgectl(
            "control-plane", "serve", *mode, "--listen", f"127.0.0.1:{cp_port}",
            "--state", f"sqlite:///{cp_dir / 'state.db'}", "--blobs", str(cp_dir / "blobs"), "--trust", str(trusted),
            "--console-listen", f"127.0.0.1:{console_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        ))  # fmt: skip
        self._await("control-plane", "127.0.0.1", cp_port)
        self._await("control-plane", "127.0.0.1", console_port)
        endpoints = Endpoints(mqtt=self.broker.url, control_plane=f"127.0.0.1:{cp_port}")
        endpoints.console = f"{'https' if self.secure else 'http'}://127.0.0.1:{console_port}/"
        endpoints.metrics["control-plane"] = f"127.0.0.1:{metrics_port}"
        if self.layout is not None:
            endpoints.mqtt = self.layout.url
            endpoints.device_grpc = f"127.0.0.1:{device_port}"
            endpoints.ca = str(self.layout.ca_cert)
            endpoints.token_file = str(self._admin_token(self.layout))
        # Saved early, and again after each agent: the enrollment calls below find the CA and the
        # token like any client, and `edgectl down` can stop a start-up that died half-way.
        self.endpoints = endpoints
        self._save(endpoints)
        cloud_port = free_port()
        endpoints.cloud = self._start_agent("cloud", cloud_port, {"tier": "cloud"}, endpoints, burst=None)
        self._save(endpoints)
        for i in range(1, self.agent_count + 1):
            endpoints.agents.append(self._start_agent(f"edge-{i}", free_port(), {"tier": "edge", "site": "local"},
                                                      endpoints, burst=f"127.0.0.1:{cloud_port}"))  # fmt: skip
            self._save(endpoints)
        return endpoints

    def _save(self, endpoints: Endpoints) -> None:
        """endpoints.json with the pid of every process started so far."""
        if self.broker is not None:
            endpoints.pids["broker"] = self.broker.pid
        for name, proc in self.children.items():
            endpoints.pids[name] = proc.pid
        endpoints.write(self.data_dir)

    def _admin_token(self, layout: BrokerLayout) -> Path:
        """An admin bearer token for this machine's user, signed with the control plane's token key."""
        from edgectl.control_plane.security import TOKEN_KEY_FILE  # the control-plane extra, only here

        token = TokenIssuer.load_or_create(layout.directory / TOKEN_KEY_FILE).issue("edgectl-up", Role.ADMIN)
        path = self.data_dir / "admin.token"
        write_private(path, token.encode())
        return path

    def _enrollment(
        self, device_id: str, labels: dict[str, str], endpoints: Endpoints
    ) -> tuple[list[str], dict[str, str]]:
        """The agent flags and env of a secured fleet: a one-time token (in the env) unless enrolled."""
        from edgectl.agent.config import CREDENTIALS_FILE  # the agent extra, only here

        assert endpoints.ca is not None and endpoints.device_grpc is not None
        flags = [
            "--control-plane",
            endpoints.device_grpc,
            "--mqtt",
            endpoints.mqtt,
            "--ca-file",
            endpoints.ca,
        ]
        if (self.data_dir / "agents" / device_id / CREDENTIALS_FILE).exists():
            return flags, {}
        credentials = resolve_credentials(data_dir=self.data_dir)
        with ControlPlaneClient(endpoints.control_plane, credentials=credentials) as client:
            token = client.call(client.fleet.CreateEnrollmentToken,
                                fleet_pb2.CreateEnrollmentTokenRequest(device_id=device_id, labels=labels)).token  # fmt: skip
        return [*flags, "--enroll-server", endpoints.control_plane], {ENROLL_TOKEN_ENV: token}

    def _start_agent(
        self, device_id: str, port: int, labels: dict[str, str], endpoints: Endpoints, burst: str | None
    ) -> AgentEndpoint:
        argv = _edgectl(
            "agent", "run", "--device-id", device_id, "--data-dir", str(self.data_dir / "agents" / device_id),
            "--listen", f"127.0.0.1:{port}", "--labels", format_labels(labels),
            "--trust", str(self.data_dir / "trusted"),
        )  # fmt: skip
        env: dict[str, str] = {}
        if endpoints.secure:
            flags, env = self._enrollment(device_id, labels, endpoints)
            argv += flags
        else:
            argv += ["--control-plane", endpoints.control_plane, "--mqtt", endpoints.mqtt]
        if burst:
            argv += ["--burst", burst]
        metrics = f"127.0.0.1:{free_port()}"  # on by default: what an operator would scrape
        argv += ["--metrics", metrics, "--log-format", "json"]
        endpoints.metrics[device_id] = metrics
        proc = self._spawn(device_id, argv, env)
        self._await(device_id, "127.0.0.1", port)
        return AgentEndpoint(device_id=device_id, v2=f"127.0.0.1:{port}", labels=labels, pid=proc.pid)

    def stop(self) -> None:
        """SIGTERM every child (agents first, broker last), SIGKILL what lingers."""
        for name in reversed(list(self.children)):
            _terminate(self.children[name].pid)
        for proc in self.children.values():
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill(proc.pid)
                proc.wait()
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
        Endpoints.remove(self.data_dir)

    def wait(self) -> int:
        """Block until a child dies (returns its name's exit code) or the caller interrupts."""
        while True:
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    raise LocalFleetError(f"{name} exited with code {proc.returncode}",
                                          hint=f"see {self.data_dir / 'logs' / (name + '.log')}")  # fmt: skip
            time.sleep(0.5)


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _any_alive(endpoints: Endpoints) -> bool:
    return any(_alive(pid) for pid in endpoints.pids.values() if pid)


def stop_detached(data_dir: Path, grace_s: float = STOP_GRACE_S) -> list[str]:
    """`edgectl down`: stop a detached fleet by the pids in its endpoints.json; returns what was stopped."""
    endpoints = Endpoints.read(data_dir)
    stopped = []
    for name, pid in endpoints.pids.items():
        if _alive(pid):
            _terminate(pid)
            stopped.append(name)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _any_alive(endpoints):
        time.sleep(0.1)
    for pid in endpoints.pids.values():
        if _alive(pid):
            _kill(pid)
    Endpoints.remove(data_dir)
    return stopped
