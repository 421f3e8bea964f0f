"""The artifact package stays light enough for the agent, and the golden check behaves."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from edgectl.artifact import GoldenRef, golden_matches


def test_import_pulls_no_heavy_dependencies() -> None:
    code = (
        "import sys, edgectl.artifact\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'boto3', 'botocore', 'pyfastcdc')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_golden_tolerances() -> None:
    want = np.linspace(-1, 1, 100, dtype=np.float32)
    ok, _ = golden_matches(want, want + 1e-5, GoldenRef(atol=1e-4, rtol=0.0))
    assert ok
    ok, why = golden_matches(want, want + 1e-2, GoldenRef(atol=1e-4, rtol=0.0))
    assert not ok and "max abs diff" in why
    ok, why = golden_matches(want, want * 1.5, GoldenRef(min_cosine=0.999))
    assert ok, why  # same direction: cosine 1
    ok, _ = golden_matches(want, -want, GoldenRef(min_cosine=0.5))
    assert not ok
    ok, why = golden_matches(want, want[:10], GoldenRef())
    assert not ok and "shape" in why
