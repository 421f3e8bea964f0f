"""A whole fleet on free ports for fault tests and the fleet benchmark: a real mosquitto, the
control plane as its own process (so it can be killed -9), simulated devices that are real
agents (``edgectl.sim``), and signed ONNX artifacts of a chosen size."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edgectl.artifact import Artifact, ArtifactError, SigningKey, TrustStore, load_artifact, public_pem
from edgectl.broker import MosquittoProcess
from edgectl.client import ClientCredentials, ControlPlaneClient, push_artifact
from edgectl.mqtt.wire import ALL_REPORTED, DeviceIdError, PayloadError, decode, parse_topic
from edgectl.ports import free_port, wait_for_port
from edgectl.protos.v1 import common_pb2, fleet_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.broker_files import BrokerLayout
from edgectl.security.tokens import Role, TokenIssuer
from edgectl.sim import FleetSimulator, SimDevice, SimSettings, issue_tokens, make_devices
from tests.agent.onnx_models import mlp_artifact
from tests.harness.mqtt import MqttTestClient

T = TypeVar("T")


def wait_for(
    check: Callable[[], T], timeout: float = 30.0, what: str = "condition", interval: float = 0.1
) -> T:
    """Poll ``check`` until truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ControlPlaneProcess:
    """The control plane as its own process on a fixed port, restartable (or killable) on the same state."""

    def __init__(
        self,
        work: Path,
        broker_url: str,
        trust_pem: Path,
        log_level: str = "info",
        security_dir: Path | None = None,
        site_brokers: Sequence[Path] = (),
        blobs: str | None = None,
    ) -> None:
        """Insecure dev mode, or secured with ``security_dir`` (`edgectl broker config --out DIR`):
        TLS + tokens on ``address``, mTLS for agents on ``device_address``; ``site_brokers``: their dirs.
        ``blobs``: the blob store URL (default: a directory in ``work``; ``s3://...`` reads its endpoint
        from the env)."""
        self.work = work
        self.secured = security_dir is not None
        self.port = free_port()
        self.device_port = free_port()
        self.log = work / "cp.log"
        # The server directly (not through the CLI): the same ControlPlane `control-plane serve` runs.
        code = (
            "import dataclasses, sys; from pathlib import Path; from edgectl.control_plane.logs import configure; "
            "from edgectl.control_plane.config import ControlPlaneConfig; from edgectl.control_plane.server import ControlPlane; "
            "configure('text', sys.argv[7]); "
            "kw = dict(listen=sys.argv[1], device_listen=sys.argv[2], mqtt_url=sys.argv[3], "
            "state_url=sys.argv[4], blobs=sys.argv[5], trust=(Path(sys.argv[6]),)); "
            "kw.update(security_dir=Path(sys.argv[8])) if sys.argv[8] else kw.update(insecure=True); "
            "kw.update(site_brokers=tuple(Path(p) for p in sys.argv[9].split(chr(10)) if p)); "
            "names = {f.name for f in dataclasses.fields(ControlPlaneConfig)}; "
            "ControlPlane(ControlPlaneConfig(**{k: v for k, v in kw.items() if k in names})).serve()"
        )
        self.argv = [
            sys.executable, "-c", code, f"127.0.0.1:{self.port}", f"127.0.0.1:{self.device_port}", broker_url,
            f"sqlite:///{work}/cp.db", blobs or str(work / "blobs"), str(trust_pem), log_level, str(security_dir or ""),
            "\n".join(map(str, site_brokers)),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def device_address(self) -> str:
        """Where agents fetch: the mTLS listener when secured, else the one plaintext listener."""
        return f"127.0.0.1:{self.device_port}" if self.secured else self.address

    @property
    def blobs(self) -> Path:
        return self.work / "blobs"

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        if not wait_for_port("127.0.0.1", self.port, timeout):
            raise AssertionError(f"control plane did not listen:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sized_artifact(work: Path, key: SigningKey, version: int, size_bytes: int, **kw: Any) -> Artifact:
    """A signed MLP artifact whose model.onnx is about ``size_bytes`` (weights differ per version)."""
    hidden = max(8, size_bytes // (4 * (64 + 8)))
    kw.setdefault("seeds", [version * 10 + 1, version * 10 + 2])
    return mlp_artifact(
        work / "bundles" / f"v{version}-{size_bytes}",
        work / "models",
        key,
        version=version,
        dims=(64, hidden, 8),
        **kw,
    )


class ReportedStates:
    """Every device's latest retained ReportedState, read off the broker as the control plane does."""

    def __init__(self, host: str, port: int, **auth: Any) -> None:
        self.client = MqttTestClient(host, port, **auth)
        if self.client.connect().is_failure:
            raise AssertionError("the broker refused the reports watcher")
        self.client.subscribe(ALL_REPORTED)
        self.latest: dict[str, mqtt_pb2.ReportedState] = {}

    def drain(self) -> dict[str, mqtt_pb2.ReportedState]:
        while True:
            try:
                msg = self.client.messages.get_nowait()
            except queue.Empty:
                return self.latest
            try:
                device_id, _ = parse_topic(msg.topic)
                self.latest[device_id] = decode(msg.payload, mqtt_pb2.ReportedState)
            except (PayloadError, DeviceIdError, ValueError):
                continue  # junk (the flood test publishes some), or a cleared retained message

    def serving(self, name: str) -> dict[str, str]:
        return {
            device_id: m.digest
            for device_id, rs in self.drain().items()
            for m in rs.models
            if m.name == name and m.smoke_test_passed
        }

    def close(self) -> None:
        self.client.close()


def verified_on_disk(data_dir: Path, name: str, trust: TrustStore) -> str:
    """The digest a device's state.json names active for ``name``, re-verified from its disk
    (every file's sha256 and the manifest's signature), or "" when nothing verified is there."""
    state = json.loads((data_dir / "state.json").read_text())
    slot = state["models"].get(name) or {}
    active = slot.get("active")
    if not active:
        return ""
    try:
        art = load_artifact(data_dir / "artifacts" / active["path"], trust)
    except ArtifactError:
        return ""
    return art.digest if art.digest == active["digest"] else ""


class FleetRig:
    """Broker + control-plane process + simulated devices, and the operator's client.

    With ``security`` (the files `edgectl broker config` writes, and the broker started from
    them), the control plane is secured: the operator calls with an admin token over TLS, and
    every simulated device enrolls itself with its own key and uses its own broker identity."""

    def __init__(
        self,
        work: Path,
        broker: MosquittoProcess,
        key: SigningKey,
        log_level: str = "info",
        security: BrokerLayout | None = None,
        site_brokers: Sequence[Path] = (),
        blobs: str | None = None,
    ) -> None:
        self.work = work
        self.broker = broker
        self.key = key
        self.security = security
        work.mkdir(parents=True, exist_ok=True)
        self.trust_pem = work / "trusted.pub.pem"
        self.trust_pem.write_bytes(public_pem(key.public_key))
        self.credentials = ClientCredentials()
        if security is not None:
            token = TokenIssuer.load_or_create(security.directory / "token.key").issue("tests", Role.ADMIN)
            self.credentials = ClientCredentials(token=token, ca_pem=security.ca_cert.read_bytes())
        self.cp = ControlPlaneProcess(
            work,
            "" if security else broker.url,
            self.trust_pem,
            log_level,
            security.directory if security else None,
            site_brokers,
            blobs,
        )
        self.cp.start()
        self.client = ControlPlaneClient(self.cp.address, timeout=60, credentials=self.credentials)
        self.sims: list[FleetSimulator] = []
        self.reports = self._reports()

    def _reports(self) -> ReportedStates:
        if self.security is None:
            return ReportedStates(self.broker.host, self.broker.port)
        s = self.security  # the control plane's broker identity may read every device's reports
        return ReportedStates(
            self.broker.host, self.broker.port, username=s.control_plane_username,
            password=s.control_plane_password, tls_ca=str(s.ca_cert),
        )  # fmt: skip

    def push(self, art: Artifact) -> str:
        return push_artifact(self.client, art.root).artifact.ref.digest

    def settings(self, **kw: Any) -> SimSettings:
        kw.setdefault("heartbeat_s", 2.0)
        if self.security is not None:
            kw.setdefault("ca_file", self.security.ca_cert)
            kw.setdefault("enroll_server", self.cp.address)
        return SimSettings(root=self.work / "sim", control_plane=self.cp.device_address, **kw)

    def simulator(
        self,
        n: int = 0,
        labels: dict[str, str] | None = None,
        per_process: int = 100,
        prefix: str = "sim",
        devices: Sequence[SimDevice] | None = None,
        **settings: Any,
    ) -> FleetSimulator:
        """Enroll ``n`` devices (or ``devices``) with tokens from the control plane; not started yet."""
        devs = list(devices) if devices is not None else make_devices(n, prefix, labels or {"fleet": "sim"})
        tokens = issue_tokens(self.cp.address, devs, self.credentials)
        sim = FleetSimulator(self.settings(**settings), tokens, per_process)
        self.sims.append(sim)
        return sim

    def simulate(self, n: int = 0, env: dict[str, str] | None = None, **kw: Any) -> FleetSimulator:
        """``simulator(...)``, started: returns once every agent runs."""
        sim = self.simulator(n, **kw)
        sim.start(env=env)
        return sim

    def reconnect_reports(self) -> None:
        """A fresh subscription (after a broker restart): the retained reports arrive again."""
        self.reports.close()
        self.reports = self._reports()

    def devices(self) -> dict[str, fleet_pb2.Device]:
        """The inventory as the control plane sees it (retries while it restarts)."""
        try:
            resp = self.client.fleet.ListDevices(fleet_pb2.ListDevicesRequest(), timeout=10)
        except grpc.RpcError:
            return {}
        return {d.id: d for d in resp.devices}

    def serving(self, name: str) -> dict[str, str]:
        """device id -> the digest it reports (retained, over MQTT) serving with a passed smoke test."""
        return self.reports.serving(name)

    def wait_all_online(self, ids: Sequence[str], timeout: float = 120.0) -> None:
        wait_for(
            lambda: all(d.online for i, d in self.devices().items() if i in ids) and set(ids) <= set(self.devices()),
            timeout, what=f"{len(ids)} devices online", interval=0.5,
        )  # fmt: skip

    def wait_serving(self, name: str, digest: str, ids: Sequence[str], timeout: float = 120.0) -> None:
        wait_for(
            lambda: all(self.serving(name).get(i) == digest for i in ids),
            timeout, what=f"{len(ids)} devices serving {digest[:19]}", interval=0.5,
        )  # fmt: skip

    def rollout(
        self,
        artifact: str,
        labels: dict[str, str],
        waves: Sequence[str],
        health_timeout_s: int = 60,
        **kw: Any,
    ) -> RP.Rollout:
        return self.client.rollouts.Create(
            RP.CreateRolloutRequest(
                artifact=artifact,
                selector=common_pb2.Selector(match_labels=labels),
                strategy=RP.Strategy(waves=list(waves), health_timeout_seconds=health_timeout_s, **kw),
            ),
            timeout=30,
        )

    def get(self, rollout_id: str) -> RP.Rollout:
        return self.client.rollouts.Get(RP.GetRolloutRequest(id=rollout_id), timeout=10)

    def wait_done(self, rollout_id: str, timeout: float = 180.0, interval: float = 0.5) -> RP.Rollout:
        """The rollout once it reached a final state (polls every ``interval`` s, so it survives a
        control-plane restart)."""
        final = (RP.ROLLOUT_STATE_SUCCEEDED, RP.ROLLOUT_STATE_FAILED, RP.ROLLOUT_STATE_ROLLED_BACK,
                 RP.ROLLOUT_STATE_ABORTED)  # fmt: skip

        def done() -> RP.Rollout | None:
            try:
                r = self.get(rollout_id)
            except grpc.RpcError:
                return None
            return r if r.state in final else None

        return wait_for(done, timeout, what=f"rollout {rollout_id} to finish", interval=interval)

    def close(self) -> None:
        for sim in self.sims:
            sim.stop()
        self.client.close()
        self.reports.close()
        self.cp.stop()
