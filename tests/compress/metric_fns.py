"""Quality metrics as a user writes them, for ``--metric tests.compress.metric_fns:NAME``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def negative_max_error(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> float:
    """0 for the float model's own outputs, more negative the further a candidate strays."""
    assert set(inputs) == {"image"} and len(reference) == len(outputs) == 1
    return -float(np.abs(reference[0] - outputs[0]).max())


def explodes(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> float:
    """A metric with a bug."""
    raise KeyError("logits")


def not_a_number(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> float:
    """A metric that divides by zero somewhere."""
    return float("nan")


def a_string(inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]) -> str:
    """A metric that returns the wrong type."""
    return "0.99"


def negative_max_error_any(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> float:
    """``negative_max_error`` for a model with any inputs: anything but the float outputs scores below 0."""
    return -float(max(np.abs(r - o).max() for r, o in zip(reference, outputs, strict=True)))


def error_in_place(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> float:
    """A metric that reuses the reference's memory for the error: every later candidate saw that error."""
    error = reference[0]
    error -= outputs[0]
    return -float(np.abs(error).mean())


def squared_error(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> float:
    """An error, lower is better: 0 for the float model, so every candidate "gained" quality."""
    return float(np.mean((reference[0] - outputs[0]) ** 2))


def agreement_as_array(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> np.ndarray:
    """Top-1 agreement as numpy hands it back from tensordot: an array of one value, not a float."""
    same = (reference[0].argmax(1) == outputs[0].argmax(1)).astype(np.float64)
    return np.asarray(np.tensordot(same, np.full_like(same, 1.0 / len(same)), 1))


def two_values(
    inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
) -> np.ndarray:
    """Per-output scores where one is wanted."""
    return np.array([0.9, 0.8])
