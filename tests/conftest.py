"""Shared fixtures: a throwaway mosquitto per test on a free port, with its own config.

Tests that need mosquitto fail loudly in CI (CI=true) when it is missing and skip with the
install command otherwise. One signing key per session and the trust store holding it serve
every suite that builds artifacts; one S3-compatible server (moto's, over real HTTP) serves every
suite that stores blobs in S3. The parts' own fixtures live in their folders' conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgectl.artifact import SigningKey, TrustStore
from edgectl.broker import INSTALL_HINT, BrokerConfig, MosquittoProcess, find_mosquitto
from edgectl.ports import free_port
from edgectl.security.broker_files import BrokerLayout, write_broker_files

REAL_S3_ENV = "EDGECTL_TEST_S3_ENDPOINT"

# pytest-xdist's workers start with COLUMNS=80 set, and rich's consoles, made when edgectl.cli is
# imported, would keep that width for good: drop it so a test's own COLUMNS (or none) decides, as it
# does in one process.
for _fixed in ("COLUMNS", "LINES"):
    os.environ.pop(_fixed, None)


def require_mosquitto() -> Path:
    """The mosquitto binary; a failure in CI, a skip elsewhere, when it is missing."""
    binary = find_mosquitto()
    if binary is None:
        message = f"mosquitto is not installed; {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def start_secured_broker(
    folder: Path, data_dir: Path | None = None, hostnames: Sequence[str] = ("127.0.0.1",)
) -> tuple[BrokerLayout, MosquittoProcess]:
    """Write `edgectl broker config`'s files (TLS, dynamic security) under ``folder`` for a free port
    on 127.0.0.1 and start mosquitto on them; the caller kills the broker."""
    binary = require_mosquitto()
    layout = write_broker_files(folder, hostnames=list(hostnames), host="127.0.0.1", port=free_port())
    broker = MosquittoProcess(layout.broker_config(data_dir), binary=binary)
    broker.start()
    return layout, broker


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A running mosquitto on a free port with persistence under tmp_path; tests may restart or kill it."""
    binary = require_mosquitto()
    broker = MosquittoProcess(BrokerConfig(data_dir=tmp_path / "broker"), binary=binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    """The key every artifact of the session is signed with."""
    return SigningKey.generate()


@pytest.fixture
def trust(signing_key: SigningKey) -> TrustStore:
    """A trust store holding exactly the session's signing key."""
    return TrustStore([signing_key.public_key])


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible HTTP endpoint and the credentials that open it."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> object:
        """A boto3 S3 client for this endpoint."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
        )  # fmt: skip


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    """moto's S3 server over real HTTP on a free loopback port, for the whole session."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the dev extra)")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(f"http://{host}:{port}", "testing", "testing")
    finally:
        server.stop()


def real_s3() -> S3Endpoint | None:
    """The real S3 endpoint named by EDGECTL_TEST_S3_ENDPOINT (+ _ACCESS_KEY, _SECRET_KEY, _REGION)."""
    url = os.environ.get(REAL_S3_ENV)
    if not url:
        return None
    return S3Endpoint(
        url,
        os.environ.get("EDGECTL_TEST_S3_ACCESS_KEY", os.environ.get("AWS_ACCESS_KEY_ID", "")),
        os.environ.get("EDGECTL_TEST_S3_SECRET_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "")),
        os.environ.get("EDGECTL_TEST_S3_REGION", "us-east-1"),
    )
