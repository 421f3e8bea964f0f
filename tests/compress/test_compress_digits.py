"""The packaged digits CNN and the Python API the demo uses: train, compress an nn.Module, sign."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgectl.artifact import SigningKey, TrustStore, verify_bundle
from edgectl.compress.digits import INPUT_NAME, accuracy, digits_data, write_npz_files
from edgectl.compress.pipeline import compress_module
from edgectl.compress.recipe import Recipe


def test_digits_split_is_float32_nchw_and_disjoint() -> None:
    x_train, y_train, x_eval, y_eval = digits_data()
    assert x_train.dtype == np.float32 and x_train.shape[1:] == (1, 8, 8)
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert len(x_train) + len(x_eval) == 1797 and len(y_train) == len(x_train) and len(y_eval) == len(x_eval)
    assert set(np.unique(y_eval)) == set(range(10))


def test_trained_cnn_compresses_through_the_python_api(digits: dict[str, Any], tmp_path: Path) -> None:
    model = digits["model"]
    _, _, x_eval, y_eval = digits_data()
    assert accuracy(model, x_eval, y_eval) >= 0.95
    files = write_npz_files(tmp_path / "data")
    with np.load(files.eval) as npz:
        assert set(npz.files) == {INPUT_NAME, "labels"}
    key = SigningKey.generate()
    key_path = tmp_path / "signer.pem"
    key.save(key_path)
    # One format, no search: the CLI tests cover the search; this covers the API the demo calls.
    recipe = Recipe.from_dict({"passes": ["cleanup", {"quantize": {"mode": "int8-static", "search": False}}]})
    out = tmp_path / "digits-v1"
    result = compress_module(
        model, out, profile="x86-cpu-vnni", sign_key=key_path, calib=files.calib, eval=files.eval,
        max_drop=0.01, recipe=recipe, name="digits", version=1,
    )  # fmt: skip
    assert result.out_dir == out and (out / "manifest.json").is_file()
    assert result.rows[0]["name"] == "float (baseline)" and result.rows[0]["metric"] == "top1"
    assert any(r["note"] == "chosen" or "chosen" in str(r["note"]) for r in result.rows)
    assert result.metrics["quality_drop"] <= 0.01 and result.metrics["size_ratio"] >= 3.5
    # The cleaned float was timed too: the like-for-like speed-up is never above the one vs the export.
    assert 0 < result.metrics["speedup_vs_best_float"] <= result.metrics["speedup"]
    trust = TrustStore([key.public_key])
    assert verify_bundle(out, trust).manifest.name == "digits"
