"""`edgectl up`: a whole fleet on one machine, as real processes on free ports.

A mosquitto, the control plane (SQLite + local blobs) and N agents, plus one more agent
labelled ``tier=cloud`` that the edge agents burst to: the cloud endpoint is deployed to like
any device. Where everything listens goes to ``endpoints.json`` in the data dir, which other
commands read when no flag or env names a server. Stopping is graceful (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgectl.artifact import default_key_path, default_signing_key
from edgectl.artifact.signing import public_key_path
from edgectl.broker import BrokerConfig, MosquittoProcess
from edgectl.errors import EdgectlError
from edgectl.ports import free_port, wait_for_port

ENDPOINTS_FILE = "endpoints.json"
DATA_DIR_ENV = "EDGECTL_DATA_DIR"
STOP_GRACE_S = 10.0


class LocalFleetError(EdgectlError):
    """A part of the local fleet did not start or stop."""


def default_data_dir() -> Path:
    """``$EDGECTL_DATA_DIR`` or ``~/.edgectl``: the same place clients look for endpoints.json."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".edgectl"


@dataclass
class AgentEndpoint:
    device_id: str
    v2: str
    labels: dict[str, str]
    pid: int = 0


@dataclass
class Endpoints:
    """Where a local fleet listens; written to endpoints.json."""

    mqtt: str
    control_plane: str
    agents: list[AgentEndpoint] = field(default_factory=list)
    cloud: AgentEndpoint | None = None
    pids: dict[str, int] = field(default_factory=dict)

    def write(self, data_dir: Path) -> Path:
        path = data_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, data_dir: Path) -> Endpoints:
        path = data_dir / ENDPOINTS_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LocalFleetError(
                f"no local fleet at {data_dir}", hint="start one with `edgectl up`"
            ) from None
        except ValueError as exc:
            raise LocalFleetError(
                f"{path} is damaged: {exc}", hint="run `edgectl down` then `edgectl up`"
            ) from exc
        agents = [AgentEndpoint(**a) for a in raw.get("agents", [])]
        cloud = AgentEndpoint(**raw["cloud"]) if raw.get("cloud") else None
        return cls(raw["mqtt"], raw["control_plane"], agents, cloud, raw.get("pids", {}))


def _edgectl(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgectl", *args]


class LocalFleet:
    """Starts and stops the processes of a single-box fleet."""

    def __init__(
        self, data_dir: Path, agents: int = 2, log: bool = True, trust: list[Path] | None = None
    ) -> None:
        if agents < 0:
            raise LocalFleetError("--agents must be 0 or more")
        self.data_dir = data_dir.resolve()
        self.agent_count = agents
        self.trust = trust
        self.broker: MosquittoProcess | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoints: Endpoints | None = None
        self._log = log

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
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
        self.broker = MosquittoProcess(BrokerConfig(data_dir=self.data_dir / "broker"))
        self.broker.start()
        cp_port = free_port()
        cp_dir = self.data_dir / "control-plane"
        cp_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("control-plane", _edgectl(
            "control-plane", "serve", "--listen", f"127.0.0.1:{cp_port}", "--mqtt", self.broker.url,
            "--state", f"sqlite:///{cp_dir / 'state.db'}", "--blobs", str(cp_dir / "blobs"), "--trust", str(trusted), "--insecure",
        ))  # fmt: skip
        self._await("control-plane", "127.0.0.1", cp_port)
        endpoints = Endpoints(mqtt=self.broker.url, control_plane=f"127.0.0.1:{cp_port}")
        cloud_port = free_port()
        endpoints.cloud = self._start_agent("cloud", cloud_port, {"tier": "cloud"}, endpoints, burst=None)
        for i in range(1, self.agent_count + 1):
            endpoints.agents.append(self._start_agent(f"edge-{i}", free_port(), {"tier": "edge", "site": "local"},
                                                      endpoints, burst=f"127.0.0.1:{cloud_port}"))  # fmt: skip
        endpoints.pids["broker"] = self.broker.pid
        for name, proc in self.children.items():
            endpoints.pids[name] = proc.pid
        self.endpoints = endpoints
        endpoints.write(self.data_dir)
        return endpoints

    def _start_agent(
        self, device_id: str, port: int, labels: dict[str, str], endpoints: Endpoints, burst: str | None
    ) -> AgentEndpoint:
        argv = _edgectl(
            "agent", "run", "--device-id", device_id, "--mqtt", endpoints.mqtt,
            "--control-plane", endpoints.control_plane, "--data-dir", str(self.data_dir / "agents" / device_id),
            "--listen", f"127.0.0.1:{port}", "--labels", ",".join(f"{k}={v}" for k, v in labels.items()),
            "--trust", str(self.data_dir / "trusted"),
        )  # fmt: skip
        if burst:
            argv += ["--burst", burst]
        proc = self._spawn(device_id, argv)
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
        (self.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)

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
    (data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
    return stopped
