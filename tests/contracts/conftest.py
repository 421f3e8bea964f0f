"""Contract suites: each runs the same tests against a test double and the real implementation."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.config/edgectl or ~/.edgectl."""
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(tmp_path / "edgectl-config"))
    monkeypatch.setenv("EDGECTL_DATA_DIR", str(tmp_path / "edgectl-data"))
    monkeypatch.delenv("EDGECTL_SERVER", raising=False)
