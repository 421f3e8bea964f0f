"""kill -9 of a real agent process during download and during a swap: it restarts serving old or new."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgectl.broker import MosquittoProcess
from edgectl.ports import free_port, wait_for_port
from edgectl.protos.v1 import mqtt_pb2 as mpb
from tests.agent.artifact_server import ArtifactStoreServer
from tests.agent.conftest import Bundles, Fleet, V2Client, wait_for
from tests.agent.onnx_models import run_direct


def agent_argv() -> list[str]:
    """`python -m edgectl agent run` once the root CLI mounts the agent app; its app directly until then."""
    from edgectl.cli import app
    from edgectl.cli.agent import app as agent_app

    if any(g.typer_instance is agent_app for g in app.registered_groups):
        return [sys.executable, "-m", "edgectl", "agent", "run"]
    return [sys.executable, "-c", "from edgectl.cli.agent import app; app()", "run"]


class AgentProcess:
    def __init__(self, tmp: Path, broker: MosquittoProcess, cp: str, trust: Path) -> None:
        self.port = free_port()
        self.argv = [
            *agent_argv(),
            "--device-id",
            "dev-1",
            "--mqtt",
            broker.url,
            "--control-plane",
            cp,
            "--data-dir",
            str(tmp / "agent"),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--trust",
            str(trust),
            "--profile",
            "x86-cpu-avx2",
            "--heartbeat",
            "1",
            "--intra-op-threads",
            "1",
        ]
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, crashpoint: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("EDGECTL_AGENT_CRASHPOINT", None)
        if crashpoint:
            env["EDGECTL_AGENT_CRASHPOINT"] = crashpoint
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        assert wait_for_port("127.0.0.1", self.port, 30), self.log.read_text()[-3000:]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def agent_proc(
    tmp_path: Path, mosquitto: MosquittoProcess, artifact_server: ArtifactStoreServer, trust_file: Path
) -> Iterator[AgentProcess]:
    p = AgentProcess(tmp_path, mosquitto, artifact_server.address, trust_file)
    try:
        yield p
    finally:
        p.stop()


def test_kill9_during_download_resumes_from_the_last_chunk(
    artifact_server: ArtifactStoreServer, fleet: Fleet, bundles: Bundles, agent_proc: AgentProcess
) -> None:
    v1 = bundles.build(version=1, dims=(64, 1024, 1024, 8))
    d1 = artifact_server.add(v1.root)
    n_chunks = len({c.digest for f in v1.manifest.files for c in f.chunks})
    artifact_server.faults.chunk_delay_s = 0.15
    agent_proc.start()
    fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    wait_for(lambda: sum(artifact_server.served.values()) >= 4, what="a few chunks to be served")
    agent_proc.kill9()
    served_before = sum(artifact_server.served.values())
    assert served_before < n_chunks
    artifact_server.faults.chunk_delay_s = 0.0
    agent_proc.start()
    fleet.wait_serving("mlp", d1, timeout=30)
    # Each chunk at most twice, and only those in flight at the kill re-fetched: the one being
    # read and the one the server had already written into the stream's buffer.
    refetched = sum(artifact_server.served.values()) - n_chunks
    assert refetched <= 2, f"{refetched} chunks fetched again after the restart"
    assert max(artifact_server.served.values()) <= 2


@pytest.mark.parametrize("point", ["before-swap", "after-swap-before-commit", "after-commit"])
def test_kill9_during_swap_restarts_serving_the_old_or_the_new_model(
    artifact_server: ArtifactStoreServer, fleet: Fleet, bundles: Bundles, agent_proc: AgentProcess, point: str
) -> None:
    v1, v2 = bundles.build(version=1), bundles.build(version=2, seeds=[5, 6])
    d1, d2 = artifact_server.add(v1.root), artifact_server.add(v2.root)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    want = {
        "1": run_direct(v1.root / "model.onnx", {"x": x})["y"],
        "2": run_direct(v2.root / "model.onnx", {"x": x})["y"],
    }
    agent_proc.start(crashpoint=point)  # v1's first install passes through the same points: it dies there too
    fleet.desire(mpb.DesiredModel(name="mlp", digest=d1, version=1))
    agent_proc.wait_exit()
    agent_proc.start()
    fleet.wait_serving("mlp", d1)
    agent_proc.stop()
    agent_proc.start(crashpoint=point)
    fleet.desire(mpb.DesiredModel(name="mlp", digest=d2, version=2))
    assert agent_proc.wait_exit() == -signal.SIGKILL
    agent_proc.start()
    client = V2Client(f"127.0.0.1:{agent_proc.port}")
    # Serving from the first instant after restart: the old or the new version, never neither.
    y, served_by, version = client.infer("mlp", x)
    assert served_by == "local" and version in ("1", "2")
    np.testing.assert_allclose(y, want[version], rtol=1e-5, atol=1e-5)
    fleet.wait_serving("mlp", d2)
    wait_for(lambda: client.infer("mlp", x)[2] == "2", what="version 2 to serve")
    client.close()
