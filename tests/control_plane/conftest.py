"""Fixtures for the control-plane tests: state stores (SQLite and PostgreSQL), signed bundles,
in-process control planes on free ports against a real mosquitto, and simulated devices."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgectl.artifact import Artifact, SigningKey, TensorSpec, TrustStore, build_artifact
from edgectl.broker import MosquittoProcess
from edgectl.client import ControlPlaneClient, push_artifact
from edgectl.control_plane.config import ControlPlaneConfig
from edgectl.control_plane.server import ControlPlane
from tests.control_plane.sim_device import SimFleet

PG_URL = os.environ.get("EDGECTL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
BuildFn = Callable[..., Artifact]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real ~/.config/edgectl or ~/.edgectl."""
    cfg = tmp_path / "edgectl-config"
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("EDGECTL_DATA_DIR", str(tmp_path / "edgectl-data"))
    monkeypatch.delenv("EDGECTL_SERVER", raising=False)
    return cfg


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway schema in the test database, dropped afterwards (skip, or fail in CI, without PostgreSQL)."""
    try:
        import psycopg

        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # ImportError or a refused connection
        message = f"PostgreSQL at {PG_URL} is not reachable ({exc}); set EDGECTL_TEST_POSTGRES"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    schema = f"edgectl_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests against both state stores."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def build(signing_key: SigningKey, tmp_path: Path) -> BuildFn:
    """Build a small signed bundle; ``version`` and ``seed`` vary its bytes, keywords override the rest."""

    def _build(
        name: str = "digits", version: int = 1, seed: int = 0, size: int = 600_000, **overrides: Any
    ) -> Artifact:
        src = tmp_path / "src" / f"{name}-{version}-{seed}.onnx"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(np.random.default_rng(seed * 1000 + version).bytes(size))
        args: dict[str, Any] = {
            "name": name,
            "version": version,
            "files": {"model.onnx": src},
            "input_signature": [TensorSpec("x", "float32", ("batch", 4))],
            "output_signature": [TensorSpec("y", "float32", ("batch", 2))],
            "golden_inputs": {"x": np.ones((1, 4), dtype=np.float32)},
            "golden_outputs": {"y": np.zeros((1, 2), dtype=np.float32)},
            "recipe": {"passes": []},
            "target_profile": "x86-cpu-avx2",
            "metrics": {},
            "precision_map": {},
            "source_model_sha256": "ab" * 32,
            "signing_key": signing_key,
            "created": "2024-05-01T12:00:00Z",
            "host": "test",
        }
        args.update(overrides)
        out = tmp_path / "bundles" / f"{name}-{version}-{seed}-{uuid.uuid4().hex[:6]}"
        return build_artifact(out, **args)

    return _build


@pytest.fixture
def cp_factory(
    tmp_path: Path, mosquitto: MosquittoProcess, trust: TrustStore
) -> Iterator[Callable[..., ControlPlane]]:
    """Start in-process control planes against the test broker; all are stopped afterwards."""
    made: list[ControlPlane] = []

    def make(
        state_url: str | None = None, trust_store: TrustStore | None = None,
        clock: Callable[[], float] | None = None, **overrides: Any,
    ) -> ControlPlane:  # fmt: skip
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "insecure": True,
            "mqtt_url": mosquitto.url,
            "state_url": state_url or f"sqlite:///{tmp_path}/cp.db",
            "blobs": str(tmp_path / "blobs"),
            "tick_seconds": 0.1,
            "leader_interval": 0.2,
        }
        config = ControlPlaneConfig(**{**settings, **overrides})  # overrides win (another broker, say)
        cp = ControlPlane(
            config,
            trust=trust_store if trust_store is not None else trust,
            **({"clock": clock} if clock else {}),
        )
        cp.start()
        made.append(cp)
        return cp

    yield make
    for cp in made:
        cp.stop(grace=0)


@pytest.fixture
def cp(cp_factory: Callable[..., ControlPlane]) -> ControlPlane:
    """One leading control plane on SQLite."""
    plane = cp_factory()
    assert plane.election.leading.wait(10), "the control plane did not take leadership"
    assert plane.bus.wait_connected(10), "the control plane did not connect to the broker"
    return plane


@pytest.fixture
def client(cp: ControlPlane) -> Iterator[ControlPlaneClient]:
    with ControlPlaneClient(cp.address, timeout=20) as c:
        yield c


@pytest.fixture
def sim(mosquitto: MosquittoProcess) -> Iterator[SimFleet]:
    fleet = SimFleet(mosquitto.host, mosquitto.port)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def push(client: ControlPlaneClient) -> Callable[[Artifact], str]:
    """Push a built bundle to the control plane; returns its digest."""

    def _push(art: Artifact) -> str:
        return push_artifact(client, art.root).artifact.ref.digest

    return _push
