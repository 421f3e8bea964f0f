"""``--train``: structured pruning of a torch model recovers its accuracy by distillation from the float model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgectl.compress.digits import INPUT_NAME, digits_data
from edgectl.compress.pipeline import compress_module
from edgectl.compress.recipe import Recipe
from tests.compress.test_compress_cli import invoke


def test_recovery_lifts_the_accuracy_of_a_pruned_cnn(digits: dict[str, Any], tmp_path: Path) -> None:
    x_train, y_train, _, _ = digits_data()
    train = tmp_path / "train.npz"
    np.savez(train, **{INPUT_NAME: x_train, "labels": y_train})  # type: ignore[arg-type]
    out = tmp_path / "out"
    result = compress_module(
        digits["model"], out, profile="x86-cpu-vnni", eval=digits["eval"], train=train, max_drop=0.02,
        recipe=Recipe.from_options(quantize="none", prune=0.75, finetune_epochs=3), latency_rounds=1,
    )  # fmt: skip
    rows = {t.name: t for t in result.trials}
    pruned, recovered = rows["pruned 75% (torch)"], rows["pruned 75% + recovered (3 epochs distilled)"]
    assert pruned.quality and recovered.quality and result.baseline.quality
    # 75 % of the channels gone costs accuracy; three epochs of distillation win most of it back.
    assert recovered.quality.score > pruned.quality.score + 0.05
    assert recovered.quality.score >= result.baseline.quality.score - 0.02 and recovered.passed
    assert result.chosen is recovered
    assert recovered.params and result.baseline.params and recovered.params < 0.3 * result.baseline.params
    manifest = json.loads((out / "manifest.json").read_text())
    prune = manifest["recipe"]["prune"]
    assert (
        prune["pruner"].startswith("torch-pruning") and prune["epochs"] == 3 and prune["labels_used"] is True
    )
    assert manifest["recipe"]["recovery"]["trained"] is True


def test_onnx_input_with_train_gets_recalibration_and_is_told_why(
    digits: dict[str, Any], tmp_path: Path
) -> None:
    x_train, y_train, _, _ = digits_data()
    np.savez(tmp_path / "train.npz", **{INPUT_NAME: x_train[:64], "labels": y_train[:64]})  # type: ignore[arg-type]
    out = tmp_path / "out"
    code, text = invoke(digits["onnx"], "--profile", "x86-cpu-vnni", "--prune", "0.25", "--quantize", "none",
                        "--train", tmp_path / "train.npz", "--eval", digits["eval"], "--max-drop", "1", "-o", out)  # fmt: skip
    assert code == 0, text
    recovery = json.loads((out / "manifest.json").read_text())["recipe"]["recovery"]
    assert recovery["trained"] is False and "needs the model as PyTorch" in recovery["reason"]


def test_train_arrays_that_do_not_match_the_inputs_are_refused_like_calib(
    digits: dict[str, Any], tmp_path: Path
) -> None:
    np.savez(tmp_path / "train.npz", image=np.zeros((8, 1, 9, 9), np.float32))
    out = tmp_path / "out"
    code, text = invoke(digits["onnx"], "--profile", "x86-cpu-vnni", "--prune", "0.25", "--train",
                        tmp_path / "train.npz", "-o", out)  # fmt: skip
    assert code == 2 and "training file train.npz: array 'image' has 9 on axis 2, the model needs 8" in text
    assert not out.exists()
