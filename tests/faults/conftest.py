"""The fault matrix's fixtures: a real broker, the control plane as a killable process, simulated
devices that are real agents in worker processes (``edgectl.sim``), and signed ONNX artifacts.

Every fault test ends with the same check, ``assert_fleet_verified``: each device reports (over
MQTT, retained) the expected digest serving with a passed smoke test, and the artifact its
state file names active re-verifies from its own disk (every file's sha256 and the signature).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgectl.artifact import Artifact, SigningKey, TrustStore
from edgectl.broker import MosquittoProcess
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.sim import AgentHost, FleetSimulator
from tests.harness.fleet import FleetRig, sized_artifact, verified_on_disk, wait_for

MODEL = "mlp"
LABELS = {"fleet": "faults"}


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "edgectl-config"))
    monkeypatch.setenv("EDGECTL_DATA_DIR", str(tmp_path / "edgectl-data"))
    monkeypatch.delenv("EDGECTL_SERVER", raising=False)


@pytest.fixture
def rig(tmp_path: Path, mosquitto: MosquittoProcess, signing_key: SigningKey) -> Iterator[FleetRig]:
    r = FleetRig(tmp_path / "fleet", mosquitto, signing_key)
    try:
        yield r
    finally:
        r.close()


class Artifacts:
    """Signed MLP artifacts of a chosen size; ``bad`` ones carry golden outputs the model cannot match."""

    def __init__(self, work: Path, key: SigningKey) -> None:
        self.work, self.key = work, key
        self._built: dict[tuple[int, int], Artifact] = {}

    def good(self, version: int, size: int = 400_000) -> Artifact:
        """Built once per (version, size); later calls return the same bundle."""
        if (version, size) not in self._built:
            self._built[version, size] = sized_artifact(self.work, self.key, version, size)
        return self._built[version, size]

    def bad(self, version: int, size: int = 400_000) -> Artifact:
        wrong = {"y": np.full((2, 8), 1000.0, dtype=np.float32)}
        return sized_artifact(self.work, self.key, version, size, golden_outputs=wrong)


@pytest.fixture
def artifacts(tmp_path: Path, signing_key: SigningKey) -> Artifacts:
    return Artifacts(tmp_path / "artifacts", signing_key)


def ids_of(sim: FleetSimulator | AgentHost) -> list[str]:
    """The device ids a simulator (worker processes) or an in-process host runs."""
    return [d.device_id for d in sim.devices] if isinstance(sim, FleetSimulator) else sorted(sim.agents)


def deploy(
    rig: FleetRig, version: int, waves: Sequence[str] = ("100%",), timeout: float = 120, **kw: Any
) -> RP.Rollout:
    """Roll ``mlp:version`` out to the fault fleet and return the finished rollout."""
    kw.setdefault("health_timeout_s", 60)
    r = rig.rollout(f"{MODEL}:{version}", LABELS, waves, **kw)
    return rig.wait_done(r.id, timeout)


def assert_fleet_verified(
    rig: FleetRig,
    sim: FleetSimulator | AgentHost,
    trust: TrustStore,
    want: dict[str, str] | str,
    timeout: float = 90,
) -> None:
    """Every device serves ``want`` (one digest, or per device id): reported over MQTT with a passed
    smoke test, and verified again from the device's own disk."""
    ids = ids_of(sim)
    expected = want if isinstance(want, dict) else dict.fromkeys(ids, want)
    wait_for(
        lambda: all(rig.serving(MODEL).get(i) == expected[i] for i in ids),
        timeout, what="every device reporting the expected model serving", interval=0.25,
    )  # fmt: skip
    for i in ids:
        assert verified_on_disk(sim.settings.data_dir(i), MODEL, trust) == expected[i], i


def wave_started(rig: FleetRig, rollout_id: str, wave: int) -> bool:
    try:
        return rig.get(rollout_id).current_wave >= wave
    except Exception:
        return False
