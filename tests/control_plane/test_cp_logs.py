"""The control plane's log set-up: records go to the stderr of the moment, in text or JSON."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from edgectl.control_plane.logs import configure


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logs_follow_a_swapped_stderr_and_never_write_to_a_closed_one(
    root_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("json", "info")
    log = logging.getLogger("edgectl.control_plane.test")
    log.info("artifact committed", extra={"digest": "sha256:ab"})
    assert json.loads(first.getvalue())["digest"] == "sha256:ab"
    first.close()  # what a CLI runner does with the stderr it lent out
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.warning("still logging")
    assert "still logging" in second.getvalue() and "Logging error" not in second.getvalue()
