"""Quality metrics: how close a candidate's outputs are to the float model's, as one score.

``--metric`` picks one: ``top1`` (needs labels), ``cosine`` (every output, flattened per sample),
``masked-cosine:INPUT`` (the first output mean-pooled over the tokens the mask input keeps, what
sentence-embedding users compare) or ``module:function``, a user's own
``function(inputs, reference_outputs, outputs) -> float`` where the float model scores best.
The default is ``top1`` when the evaluation data has labels, else ``cosine``.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgectl.compress.errors import BadInputError
from edgectl.compress.user_code import import_user_module

UserMetric = Callable[[Mapping[str, np.ndarray], list[np.ndarray], list[np.ndarray]], float]


@dataclass(frozen=True)
class Quality:
    """A candidate's score in ``metric``'s units, with the worst sample's output cosine for reference."""

    metric: str
    score: float
    min_cosine: float

    def drop_from(self, baseline: Quality) -> float:
        """Absolute drop from the baseline in the metric's units (0.01 = one point)."""
        return baseline.score - self.score


def cosines(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sample cosine between two output lists (every output flattened and joined)."""
    count = ref[0].shape[0]
    r = np.concatenate([o.reshape(count, -1).astype(np.float64) for o in ref], axis=1)
    g = np.concatenate([o.reshape(count, -1).astype(np.float64) for o in got], axis=1)
    num = (r * g).sum(axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    # Two all-zero outputs are identical; one zero and one not share nothing.
    same = (den == 0) & (np.abs(r - g).max(axis=1) == 0)
    cos: np.ndarray = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(same, 1.0, 0.0))
    return cos


@dataclass(frozen=True)
class Metric:
    """One quality metric: its name as given, where it comes from, and how it scores outputs."""

    name: str
    source: str
    mask_input: str | None = None
    function: UserMetric | None = None

    @property
    def continuous(self) -> bool:
        """Whether the score moves smoothly with the outputs (a cosine), so a few samples estimate it well;
        top-1 moves in steps of one sample, and a user's function may too."""
        return self.function is None and self.name != "top1"

    def score(
        self,
        inputs: Mapping[str, np.ndarray],
        labels: np.ndarray | None,
        reference: list[np.ndarray],
        outputs: list[np.ndarray],
    ) -> Quality:
        """Score ``outputs`` against the float model's ``reference`` on these samples."""
        cos = cosines(reference, outputs)
        if self.name == "top1":
            if labels is None:
                raise BadInputError("--metric top1 needs labels", hint="save labels=... in the --eval npz")
            _check_class_scores(reference[0], labels)
            pred = outputs[0].reshape(outputs[0].shape[0], -1).argmax(axis=1)
            return Quality("top1", float((pred == labels).mean()), float(cos.min()))
        if self.mask_input is not None:
            pooled = cosines(
                [_pool(reference[0], inputs[self.mask_input])], [_pool(outputs[0], inputs[self.mask_input])]
            )
            return Quality(self.name, float(pooled.mean()), float(pooled.min()))
        if self.function is not None:
            return Quality(self.name, self._call(inputs, reference, outputs), float(cos.min()))
        return Quality("cosine", float(cos.mean()), float(cos.min()))

    def check_best_at_reference(
        self, inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], baseline: Quality
    ) -> None:
        """A user's function must score the float model's own outputs best: if the same outputs handed to
        the wrong samples score higher, it measures an error (lower is better) and would pass anything."""
        if self.function is None or reference[0].shape[0] < 2:
            return
        try:
            shifted = self._call(inputs, reference, [np.roll(r, 1, axis=0) for r in reference])
        except BadInputError:
            return  # the candidates' scores will say what is wrong with it
        if shifted - baseline.score > 1e-6 * max(1.0, abs(baseline.score)):
            raise BadInputError(
                f"--metric {self.name} scores the float model's outputs, shifted by one sample, higher "
                f"({shifted:.6g}) than in place ({baseline.score:.6g}): it must score the float model's own "
                "outputs best, and every candidate would pass",
                hint="if it returns an error or a loss (lower is better), return its negative",
            )

    def _call(
        self, inputs: Mapping[str, np.ndarray], reference: list[np.ndarray], outputs: list[np.ndarray]
    ) -> float:
        assert self.function is not None
        # Read-only views: the reference outputs and inputs are shared by every candidate, and a function
        # that changed them in place (``d = ref[0]; d -= out[0]``) scored the rest against garbage.
        try:
            value = self.function(
                {k: _read_only(v) for k, v in inputs.items()},
                [_read_only(r) for r in reference],
                [_read_only(o) for o in outputs],
            )
        except Exception as exc:
            raise BadInputError(
                f"--metric {self.name} raised {type(exc).__name__}: {exc}",
                hint="fix the function: it gets (inputs dict, reference outputs list, outputs list) as "
                "read-only arrays (copy one before changing it in place)",
            ) from exc
        score = _one_number(value)
        if score is None:
            size = getattr(value, "size", None)
            many = f" of {size} values" if isinstance(size, int) and size != 1 else ""
            raise BadInputError(
                f"--metric {self.name} returned {type(value).__name__}{many}, not a float",
                hint="return one number where the float model's own outputs score best",
            )
        if not math.isfinite(score):
            raise BadInputError(f"--metric {self.name} returned {score}", hint="return a finite number")
        return score


def _one_number(value: object) -> float | None:
    """The real number a metric returned: a Python or numpy number, or an array (or CPU tensor) holding
    exactly one, as ``np.tensordot`` and ``.squeeze()`` give; None for anything else (a bool included)."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # a tensor that needs grad, an object numpy cannot read
        return None
    if array.size != 1 or array.dtype.kind not in "iuf":
        return None
    return float(array.reshape(-1)[0])


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def label_problem(output_shape: Sequence[int], low: int, high: int) -> str | None:
    """What keeps class ids ``low..high`` from scoring an output of ``output_shape`` (``[batch, classes]``,
    axes of 1 aside), or None: the one rule top-1 and recovery's cross-entropy share."""
    wide = [d for d in output_shape[1:] if d != 1]
    classes = int(wide[0]) if len(wide) == 1 else 0
    if classes and low >= 0 and high < classes:
        return None
    return (
        f"{classes} classes" if classes else f"shape {tuple(output_shape[1:])} per sample, not class scores"
    )


def _check_class_scores(output: np.ndarray, labels: np.ndarray) -> None:
    """top-1 compares labels with the first output's argmax: it must hold every label, or the float model
    scores 0 and any candidate "keeps" that score."""
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    what = label_problem(output.shape, low, high)
    if what is None:
        return
    raise BadInputError(
        f"top1 compares the labels (ids {low}..{high}) with the first output's argmax, and that output has "
        f"{what}",
        hint="save labels as class ids 0..classes-1, or pick another metric: --metric cosine, "
        "masked-cosine:INPUT or module:function",
    )


def _pool(output: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the mask keeps: ``[n, T, D]`` and ``[n, T]`` -> ``[n, D]``.

    A ``[n, D]`` output is taken as already pooled.
    """
    if mask.dtype != np.bool_ and (mask < 0).any():
        # An additive mask (0 keep, -inf or -10000 drop) read as "non-zero keeps" pools the padding only.
        raise BadInputError(
            f"masked-cosine reads its mask input as 1 for a token and 0 for padding, and this one holds "
            f"negative values (down to {float(mask.min())}): an additive mask?",
            hint="name the 0/1 attention-mask input, or use --metric cosine or module:function",
        )
    weights = (np.asarray(mask) != 0).astype(np.float64)
    if output.ndim == 2 and output.shape[0] == weights.shape[0]:
        return output.astype(np.float64)  # the model pools itself: one vector per sample already
    if output.ndim != 3 or weights.shape != output.shape[:2]:
        raise BadInputError(
            f"masked-cosine needs a [batch, tokens, dim] first output and a [batch, tokens] mask, "
            f"got {tuple(output.shape)} and {tuple(weights.shape)}",
            hint="use --metric cosine, or name the mask input the tokens are counted by",
        )
    total = (output.astype(np.float64) * weights[..., None]).sum(axis=1)
    return np.asarray(total / np.maximum(weights.sum(axis=1, keepdims=True), 1.0))


def check_metric_spec(spec: str | None) -> None:
    """Fail on a malformed or unimportable ``--metric`` before any model is exported or loaded."""
    if spec is None or spec in ("auto", "top1", "cosine") or spec.startswith("masked-cosine:"):
        return
    parse_metric(spec, input_names=(), has_labels=True)


def parse_metric(spec: str | None, *, input_names: Sequence[str], has_labels: bool) -> Metric:
    """The metric ``--metric`` names (None: top1 with labels, else cosine); bad specs fail here, early."""
    if spec is None or spec == "auto":
        return Metric("top1" if has_labels else "cosine", "edgectl built-in")
    if spec in ("top1", "cosine"):
        if spec == "top1" and not has_labels:
            raise BadInputError("--metric top1 needs labels", hint="save labels=... in the --eval npz")
        return Metric(spec, "edgectl built-in")
    if spec.startswith("masked-cosine:"):
        mask = spec.split(":", 1)[1]
        if mask not in input_names:
            raise BadInputError(
                f"--metric {spec}: the model has no input {mask!r}", hint=f"inputs: {', '.join(input_names)}"
            )
        return Metric(spec, "edgectl built-in", mask_input=mask)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInputError(
            f"--metric {spec!r} is not top1, cosine, masked-cosine:INPUT or module:function",
            hint="e.g. --metric mypkg.quality:pooled_cosine",
        )
    try:
        function = getattr(import_user_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module's own import-time error
        raise BadInputError(
            f"--metric {spec}: cannot import it ({type(exc).__name__}: {exc})",
            hint="check the module is in the current directory or on PYTHONPATH and defines the function",
        ) from exc
    if not callable(function):
        raise BadInputError(f"--metric {spec} is a {type(function).__name__}, not a function")
    return Metric(spec, _source(function), function=function)


def _source(function: object) -> str:
    """Where a user's metric lives, with the digest of its file: what the manifest records."""
    try:
        path = Path(inspect.getfile(function))  # type: ignore[arg-type]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (TypeError, OSError):
        return getattr(function, "__module__", "unknown")
    return f"{path.name} sha256:{digest}"
