"""Fixtures for the artifact tests: an isolated config dir, keys, and a small real bundle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgectl.artifact import Artifact, SigningKey, TensorSpec, build_artifact

BuildFn = Callable[..., Artifact]


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real ~/.config/edgectl: every test gets its own config dir."""
    cfg = tmp_path / "edgectl-config"
    monkeypatch.setenv("EDGECTL_CONFIG_DIR", str(cfg))
    return cfg


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """Three MiB of incompressible bytes standing in for model.onnx (chunking cares about bytes only)."""
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(7).bytes(3 * 1024 * 1024))
    return path


@pytest.fixture
def build(signing_key: SigningKey, model_file: Path) -> BuildFn:
    """Build a bundle with sensible defaults; keyword arguments override any of them."""

    def _build(out_dir: Path, **overrides: Any) -> Artifact:
        args: dict[str, Any] = {
            "name": "resnet18",
            "version": 3,
            "parent_version": 2,
            "files": {"model.onnx": model_file},
            "input_signature": [TensorSpec("input", "float32", ("batch", 3, 4, 4))],
            "output_signature": [TensorSpec("logits", "float32", ("batch", 10))],
            "golden_inputs": {"input": np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)},
            "golden_outputs": {"logits": np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)},
            "recipe": {"passes": [{"quantize": {"mode": "int8-dynamic"}}], "max_drop": 0.01},
            "target_profile": "jetson-orin-nano",
            "metrics": {
                "quality_metric": "top1",
                "baseline_quality": 0.6976,
                "compressed_quality": 0.6951,
                "latency_ms": 4.25,
                "size_bytes": 11_700_000,
            },
            "precision_map": {"/conv1/Conv": "int8", "/fc/Gemm": "fp32"},
            "source_model_sha256": "ab" * 32,
            "signing_key": signing_key,
            "created": "2024-05-01T12:00:00Z",
            "host": "builder-1",
        }
        args.update(overrides)
        return build_artifact(out_dir, **args)

    return _build


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of a file in place."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def flip() -> Callable[[Path, int], None]:
    return flip_byte


def file_size(path: Path) -> int:
    return os.stat(path).st_size
