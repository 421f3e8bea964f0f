"""Shared fixtures: a throwaway mosquitto per test on a free port, with its own config.

Tests that need mosquitto fail loudly in CI (CI=true) when it is missing and skip with the
install command otherwise. One signing key per session and the trust store holding it serve
every suite that builds artifacts; the parts' own fixtures live in their folders' conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgectl.artifact import SigningKey, TrustStore
from edgectl.broker import INSTALL_HINT, BrokerConfig, MosquittoProcess, find_mosquitto


def require_mosquitto() -> Path:
    """The mosquitto binary; a failure in CI, a skip elsewhere, when it is missing."""
    binary = find_mosquitto()
    if binary is None:
        message = f"mosquitto is not installed; {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


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
