"""`edgectl infer` against a real V2 server: its status picks the exit code docs/cli.md promises."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgectl.ports import free_port
from tests.agent.onnx_models import mlp_model
from tests.agent.v2_harness import InProcessV2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessV2]:
    s = InProcessV2(mlp_model(tmp_path / "mlp.onnx", (4, 8, 3)), name="mlp")
    try:
        yield s
    finally:
        s.close()


def infer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgectl", "infer", *args], capture_output=True, text=True, timeout=60
    )


def test_infer_answers_and_maps_each_failure_to_its_exit_code(served: InProcessV2, tmp_path: Path) -> None:
    good, bad = tmp_path / "x.npz", tmp_path / "wrong.npz"
    np.savez(good, x=np.ones((2, 4), np.float32))
    np.savez(bad, wrong=np.ones((2, 4), np.float32))
    address = served.server.address

    ok = infer("--server", address, "--model", "mlp", "--input", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "model mlp version 1" in ok.stdout

    missing = infer("--server", address, "--model", "nope", "--input", str(good))
    assert missing.returncode == 6, missing.stderr  # not found, as `devices get cam-99`
    assert "not served here" in missing.stderr

    wrong_input = infer("--server", address, "--model", "mlp", "--input", str(bad))
    assert wrong_input.returncode == 2, wrong_input.stderr  # fix your input

    nobody = f"127.0.0.1:{free_port()}"
    down = infer("--server", nobody, "--model", "mlp", "--input", str(good), "--timeout", "5")
    assert down.returncode == 9, down.stderr  # try again later
    assert nobody in down.stderr
