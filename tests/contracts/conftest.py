"""Contract suites: each runs the same tests against a test double and the real implementation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgectl.artifact import TrustStore
from edgectl.broker import MosquittoProcess
from edgectl.client import ControlPlaneClient
from edgectl.control_plane.config import ControlPlaneConfig
from edgectl.control_plane.server import ControlPlane


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.config/edgectl or ~/.edgectl."""
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "edgectl-config"))
    monkeypatch.setenv("EDGECTL_DATA_DIR", str(tmp_path / "edgectl-data"))
    monkeypatch.delenv("EDGECTL_SERVER", raising=False)


class RealControlPlane:
    """A real control plane (insecure dev mode, SQLite, local blobs unless told) leading on the test broker."""

    def __init__(
        self, tmp: Path, broker: MosquittoProcess, trust: TrustStore, blobs: str | None = None
    ) -> None:
        config = ControlPlaneConfig(
            listen="127.0.0.1:0",
            insecure=True,
            mqtt_url=broker.url,
            state_url=f"sqlite:///{tmp}/cp.db",
            blobs=blobs or str(tmp / "blobs"),
            tick_seconds=0.1,
            leader_interval=0.2,
        )
        self.cp = ControlPlane(config, trust=trust)
        self.cp.start()
        assert self.cp.election.leading.wait(10), "the control plane did not take leadership"
        assert self.cp.bus.wait_connected(10), "the control plane did not connect to the broker"
        self.address = self.cp.address
        self.client = ControlPlaneClient(self.address, timeout=20)

    def close(self) -> None:
        self.client.close()
        self.cp.stop(grace=0)
