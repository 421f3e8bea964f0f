"""What `edgectl compress` prints: user text stays as typed, notes reach the user when nothing passed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.compress.test_compress_cli import invoke
from tests.compress.test_compress_shapes import _mlp


def test_an_error_quoting_the_users_text_prints_it_as_typed(tmp_path: Path) -> None:
    # Rich read ':mask:' in "--metric masked-cosine:mask: ..." as an emoji code.
    model = _mlp(tmp_path / "m.onnx", "n")
    code, text = invoke(
        model, "--profile", "x86-cpu-vnni", "--metric", "masked-cosine:mask", "-o", tmp_path / "a"
    )
    assert code == 2, text
    assert "--metric masked-cosine:mask: the model has no input 'mask'" in text


def test_the_note_naming_the_array_used_is_shown_when_no_candidate_passes(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "m.onnx", "n")
    data = tmp_path / "d.npz"
    np.savez(data, samples=np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32))
    args = [
        model, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval", data, "--max-drop", "0",
        "--metric", "tests.compress.metric_fns:negative_max_error_any",
    ]  # fmt: skip
    code, text = invoke(*args, "-o", tmp_path / "a")
    assert code == 4, text
    assert "note: evaluation file d.npz: used its only array 'samples' for the model input 'x'" in text
    code, text = invoke(*args, "-o", tmp_path / "b", "--json")
    assert code == 4, text
    assert json.loads(text)["notes"] == [
        "evaluation file d.npz: used its only array 'samples' for the model input 'x'"
    ]


def test_a_run_timed_off_the_targets_execution_provider_says_so(tmp_path: Path) -> None:
    import onnxruntime as ort
    import pytest

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the GPU profile's execution provider: timings are the target's")
    model = _mlp(tmp_path / "m.onnx", "n")
    code, text = invoke(model, "--profile", "x86-gpu", "--quantize", "fp16", "-o", tmp_path / "a", "--json")
    assert code == 0, text
    (note,) = json.loads(text)["notes"]
    assert note.startswith("timed on CPUExecutionProvider: this onnxruntime lacks CUDAExecutionProvider")
