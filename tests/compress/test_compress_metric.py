"""``--metric``: the user's own quality function, the built-ins, and every way a metric can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.compress.test_compress_cli import invoke


def test_a_users_metric_gates_the_artifact_and_is_recorded(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    np.savez(tmp_path / "eval.npz", image=images)
    out = tmp_path / "out"
    spec = "tests.compress.metric_fns:negative_max_error"
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval",
                        tmp_path / "eval.npz", "--metric", spec, "--max-drop", "1.0", "-o", out, "--json")  # fmt: skip
    assert code == 0, text
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["quality_metric"] == spec and metrics["baseline_quality"] == 0.0
    assert metrics["quality_metric_source"].startswith("metric_fns.py sha256:")
    assert 0 < metrics["quality_drop"] <= 1.0  # int8 strays from float: the function saw both outputs
    assert all(t["metric"] == spec for t in metrics["trials"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.compress.metric_fns:explodes", "metric_fns:explodes raised KeyError"),
        ("tests.compress.metric_fns:not_a_number", "metric_fns:not_a_number returned nan"),
        ("tests.compress.metric_fns:a_string", "metric_fns:a_string returned str, not a float"),
        ("tests.compress.metric_fns:two_values", "two_values returned ndarray of 2 values, not a float"),
        # It changed the shared reference outputs in place; later candidates were scored against that.
        (
            "tests.compress.metric_fns:error_in_place",
            "error_in_place raised ValueError: output array is read-only",
        ),
        # Lower is better: every candidate scored above the float model and passed.
        (
            "tests.compress.metric_fns:squared_error",
            "squared_error scores the float model's outputs, shifted by one sample, higher",
        ),
        ("tests.compress.metric_fns:missing", "metric_fns:missing: cannot import it"),
        ("no_such_package.metrics:score", "no_such_package.metrics:score: cannot import it"),
        ("masked-cosine:attention_mask", "the model has no input 'attention_mask'"),
        ("top1", "--metric top1 needs labels"),
        ("bleu", "is not top1, cosine, masked-cosine:INPUT or module:function"),
    ],
)
def test_a_bad_metric_is_one_clear_error_and_writes_nothing(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path, spec: str, message: str
) -> None:
    np.savez(tmp_path / "eval.npz", image=images)
    out = tmp_path / "out"
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval",
                        tmp_path / "eval.npz", "--metric", spec, "-o", out)  # fmt: skip
    assert code == 2 and message in " ".join(text.split()), text
    assert "Traceback" not in text and not out.exists()


def test_a_single_array_under_another_name_feeds_the_single_input(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    np.savez(tmp_path / "eval.npz", x=images)  # the model's input is called "image"
    out = tmp_path / "out"
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval",
                        tmp_path / "eval.npz", "--max-drop", "0.05", "-o", out, "--json")  # fmt: skip
    assert code == 0, text
    notes = json.loads(text)["notes"]
    assert notes == ["evaluation file eval.npz: used its only array 'x' for the model input 'image'"]
    assert json.loads((out / "manifest.json").read_text())["recipe"]["notes"] == notes


def test_masked_cosine_pools_over_real_tokens_only() -> None:
    from edgectl.compress.metrics import parse_metric
    from tests.compress.conftest import token_samples

    inputs = token_samples(16, seed=3)
    reference = [inputs["x"] * 2.0]
    noisy = reference[0].copy()
    noisy[inputs["mask"] == 0] = np.random.default_rng(0).normal(0, 5, (int((inputs["mask"] == 0).sum()), 32))
    pooled = parse_metric("masked-cosine:mask", input_names=["x", "mask"], has_labels=False)
    plain = parse_metric("cosine", input_names=["x", "mask"], has_labels=False)
    # Padding positions are noise: a per-token cosine punishes them, the pooled embedding does not see them.
    assert pooled.score(inputs, None, reference, [noisy]).score == pytest.approx(1.0)
    assert plain.score(inputs, None, reference, [noisy]).score < 0.95
    # A model that pools itself ([n, dim]) is compared as it is.
    flat = [reference[0].mean(axis=1)]
    assert pooled.score(inputs, None, flat, [flat[0] * 3]).score == pytest.approx(1.0)


def test_labels_that_are_not_the_outputs_classes_are_refused_not_scored_zero(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    # Labels 10..19 for a 10-class model: the float model scored top-1 0.0, every int8 model "kept" it,
    # and an artifact was written behind a gate that measured nothing.
    labels = np.arange(len(images), dtype=np.int64) % 10 + 10
    np.savez(tmp_path / "eval.npz", image=images, labels=labels)
    out = tmp_path / "out"
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval",
                        tmp_path / "eval.npz", "-o", out)  # fmt: skip
    flat = " ".join(text.split())
    assert code == 2, text
    assert (
        "top1 compares the labels (ids 10..19) with the first output's argmax, and that output has 10 classes"
        in flat
    )
    assert not out.exists()


def test_top1_on_an_output_that_is_not_class_scores_is_refused() -> None:
    from edgectl.compress.errors import BadInputError
    from edgectl.compress.metrics import parse_metric

    top1 = parse_metric(None, input_names=["ids"], has_labels=True)  # labels given: top1 by default
    tokens = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    with pytest.raises(BadInputError, match=r"has shape \(6, 8\) per sample, not class scores"):
        top1.score({"ids": np.zeros((4, 6))}, np.zeros(4, np.int64), [tokens], [tokens])
    # [batch, classes, 1, 1] (a conv head) is class scores.
    scores = np.eye(4, dtype=np.float32)[:, :, None, None]
    assert top1.score({}, np.arange(4), [scores], [scores]).score == 1.0


def test_a_metric_returning_one_value_in_an_array_is_taken_as_that_number() -> None:
    from edgectl.compress.metrics import parse_metric

    # np.tensordot and .squeeze() hand back 0-d arrays: "returned ndarray, not a float" refused them.
    metric = parse_metric(
        "tests.compress.metric_fns:agreement_as_array", input_names=["image"], has_labels=False
    )
    logits = np.eye(4, dtype=np.float32)
    flipped = logits[:, ::-1].copy()
    assert metric.score({"image": logits}, None, [logits], [logits]).score == 1.0
    assert metric.score({"image": logits}, None, [logits], [flipped]).score == 0.0


def test_masked_cosine_refuses_an_additive_mask_it_would_read_backwards() -> None:
    from edgectl.compress.errors import BadInputError
    from edgectl.compress.metrics import parse_metric

    tokens = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    additive = np.array([[0, 0, -np.inf, -np.inf], [0, 0, 0, -np.inf]], np.float32)  # 0 keeps a token
    metric = parse_metric("masked-cosine:bias", input_names=["x", "bias"], has_labels=False)
    # "Non-zero keeps" pooled over the padding alone and scored that.
    with pytest.raises(BadInputError, match=r"holds negative values .* an additive mask"):
        metric.score({"x": tokens, "bias": additive}, None, [tokens], [tokens])
