"""Calibration and evaluation samples: load an ``.npz``, check it against the model, batch it.

An ``.npz`` holds one array per model input (named after it, samples on axis 0) and optionally
``labels`` (integer class ids). Every check here fails with one line saying how to fix the file.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgectl.artifact import TensorSpec
from edgectl.compress.errors import BadInputError

LABELS = "labels"


@dataclass(frozen=True)
class SampleSet:
    """Model inputs with the sample axis first, optional labels, and where they came from."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    # Something the user should be told about how the file was read (e.g. an array renamed).
    note: str = ""
    # The model's fixed batch size (an export traced at batch 1 takes exactly 1), 0 when it is free:
    # every feed built from this set then holds exactly that many samples.
    fixed_batch: int = 0

    @property
    def count(self) -> int:
        """Number of samples."""
        return int(next(iter(self.inputs.values())).shape[0])

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of at most ``size`` samples (exactly the model's fixed batch, if it has one), in order."""
        size = self.fixed_batch or size
        for start in range(0, self.count, size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def aligned(self, count: int) -> int:
        """``count`` rounded down to whole fixed batches (at least one batch)."""
        step = self.fixed_batch or 1
        return max(step, count - count % step)

    def take(self, count: int) -> SampleSet:
        """The first ``count`` samples (all of them if there are fewer), in whole fixed batches."""
        return self.part(0, self.aligned(count))

    def part(self, start: int, stop: int | None = None) -> SampleSet:
        """Samples ``start`` up to ``stop`` (the end if None), labels alike."""
        labels = None if self.labels is None else self.labels[start:stop]
        return dataclasses.replace(
            self, inputs={k: v[start:stop] for k, v in self.inputs.items()}, labels=labels
        )

    def feed(self, index: int = 0) -> dict[str, np.ndarray]:
        """One sample as a batch of one (of the model's fixed batch): what latency is measured on."""
        step = self.fixed_batch or 1
        return {k: v[index : index + step] for k, v in self.inputs.items()}


def load_npz(path: Path, *, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read an npz file into arrays and optional labels; refuse pickles and non-npz files."""
    if not path.is_file():
        raise BadInputError(f"{what} file {path} does not exist", hint="pass an existing .npz file")
    hint = "write it with numpy.savez(path, <input_name>=array, labels=array)"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:  # EOFError: an empty file
        raise BadInputError(f"{what} file {path} is not a numpy .npz archive ({exc})", hint=hint) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        # np.save's .npy: np.load hands back the array itself, and `with` on it was a TypeError traceback.
        raise BadInputError(
            f"{what} file {path} is one .npy array, not an .npz archive of named arrays", hint=hint
        )
    with loaded as npz:
        arrays: dict[str, np.ndarray] = {}
        for name in npz.files:
            try:
                arrays[name] = np.asarray(npz[name])
            except (ValueError, OSError, zipfile.BadZipFile) as exc:  # an object array: a pickle, not read
                raise BadInputError(
                    f"{what} file {path}: array {name!r} cannot be read without unpickling it ({exc})",
                    hint="save numbers, not Python objects: numpy.asarray(values, dtype=numpy.float32 or int64)",
                ) from exc
    labels = arrays.pop(LABELS, None)
    if not arrays:
        raise BadInputError(
            f"{what} file {path} holds no input arrays", hint="save one array per model input"
        )
    return arrays, labels


def _shape_hint(shape: Sequence[int | str]) -> str:
    """A model input's shape as a user writes it: samples on N, other free dims as 'any'
    (an exporter's symbol such as 's10' means nothing to the user)."""
    dims = [
        str(d) if isinstance(d, int) and d > 0 else ("N" if i == 0 else "any") for i, d in enumerate(shape)
    ]
    return f"({', '.join(dims)})"


def check_samples(
    arrays: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    inputs: Sequence[TensorSpec],
    *,
    source: str,
    any_count: bool = False,
) -> SampleSet:
    """Match arrays to the model inputs by name, dtype and shape; return them as a SampleSet.

    ``any_count``: samples that never run through the ONNX model (torch training data) need not come
    in whole batches of a batch size the export fixed.
    """
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in arrays]
    note = ""
    if missing and len(names) == 1 and len(arrays) == 1:
        # One input, one array: the name cannot be ambiguous (a torch factory's input is named after
        # forward()'s parameter, which the user may never have seen).
        ((given, array),) = arrays.items()
        arrays = {names[0]: array}
        note = f"{source}: used its only array {given!r} for the model input {names[0]!r}"
        missing = []
    if missing:
        raise BadInputError(
            f"{source} lacks array(s) for model input(s) {', '.join(missing)} (it has: {', '.join(arrays)})",
            hint="name each array after a model input, e.g. numpy.savez(f, " + f"{names[0]}=x)",
        )
    counts = set()
    for info in inputs:
        arr = arrays[info.name]
        if _same_integers(arr, np.dtype(info.dtype)):
            # Token ids saved as int32 (numpy's default int on Windows, a smaller file) are the same
            # ids as int64: converting them loses nothing, unlike float64 -> float32.
            arr = arr.astype(info.dtype)
            arrays = {**arrays, info.name: arr}
            converted = f"{source}: read array {info.name!r} as {info.dtype} (every value fits exactly)"
            note = f"{note}; {converted}" if note else converted
        if arr.dtype != np.dtype(info.dtype):
            raise BadInputError(
                f"{source}: array {info.name!r} is {arr.dtype} but the model input is {info.dtype}",
                hint=f"save it with .astype(numpy.{info.dtype})",
            )
        if arr.ndim != len(info.shape):
            raise BadInputError(
                f"{source}: array {info.name!r} has shape {arr.shape}, the model input has rank "
                f"{len(info.shape)} {info.shape}",
                hint="put samples on axis 0 and keep the model's other dimensions",
            )
        for axis, (got, want) in enumerate(zip(arr.shape, info.shape, strict=True)):
            if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                raise BadInputError(
                    f"{source}: array {info.name!r} has {got} on axis {axis}, the model needs {want}",
                    hint=f"reshape the samples to {_shape_hint(info.shape)}",
                )
        if arr.dtype.kind in "fc" and np.isnan(arr).any():
            # ±inf can be an additive mask; NaN is never an input, and it poisons scores and ranges alike.
            bad = int(np.isnan(arr).reshape(arr.shape[0], -1).any(axis=1).sum()) if arr.ndim else 1
            raise BadInputError(
                f"{source}: array {info.name!r} holds NaN in {bad} of {arr.shape[0] if arr.ndim else 1} samples",
                hint="drop or fix those samples (numpy.isnan(x).any(axis=...) finds them)",
            )
        counts.add(arr.shape[0])
    if counts == {0}:
        raise BadInputError(f"{source} holds no samples", hint="save at least one sample per input on axis 0")
    if len(counts) != 1:
        raise BadInputError(f"{source}: input arrays disagree on the sample count {sorted(counts)}")
    batch = 0 if any_count else fixed_batch(inputs)
    if batch > 1 and next(iter(counts)) % batch:
        raise BadInputError(
            f"{source}: {next(iter(counts))} samples, but the model takes batches of exactly {batch}",
            hint=f"save a multiple of {batch} samples, or export the model with a dynamic batch axis",
        )
    bad_labels = labels is not None and (
        labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.shape[0] != next(iter(counts))
    )
    if labels is not None and bad_labels:
        raise BadInputError(
            f"{source}: 'labels' must be a 1-D integer array with one class id per sample, "
            f"got {labels.dtype} {labels.shape}",
            hint="save labels=numpy.asarray(ids, dtype=numpy.int64)",
        )
    return SampleSet({n: np.ascontiguousarray(arrays[n]) for n in names}, labels, source, note, batch)


def _same_integers(arr: np.ndarray, want: np.dtype) -> bool:
    """``arr`` holds integers of another integer dtype that ``want`` represents exactly, every one of them."""
    if arr.dtype == want or arr.dtype.kind not in "iu" or want.kind not in "iu":
        return False
    if np.can_cast(arr.dtype, want, casting="safe") or arr.size == 0:
        return True
    info = np.iinfo(want)
    return bool(arr.min() >= info.min and arr.max() <= info.max)


def fixed_batch(inputs: Sequence[TensorSpec]) -> int:
    """The batch size the model's inputs fix on axis 0 (an export traced at batch 1), 0 when it is free."""
    fixed = [i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
    return max(fixed, default=0)


def read_samples(
    path: Path, inputs: Sequence[TensorSpec], *, what: str, any_count: bool = False
) -> SampleSet:
    """Load and check an npz against the model inputs (``any_count``: see ``check_samples``)."""
    arrays, labels = load_npz(path, what=what)
    return check_samples(arrays, labels, inputs, source=f"{what} file {path.name}", any_count=any_count)


def synthetic_samples(inputs: Sequence[TensorSpec], count: int, *, seed: int = 0) -> SampleSet:
    """Random samples for a model given without data: enough for latency and output fidelity."""
    rng = np.random.default_rng(seed)
    batch = fixed_batch(inputs)
    count = batch * max(1, count // batch) if batch else count
    arrays: dict[str, np.ndarray] = {}
    for info in inputs:
        # Symbolic dims other than the batch get a small size: we only need a runnable feed.
        shape = [count] + [d if isinstance(d, int) and d > 0 else 16 for d in info.shape[1:]]
        dtype = np.dtype(info.dtype)
        if dtype.kind == "f":
            arrays[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[info.name] = np.ones(shape, dtype=dtype)
        else:
            # 0/1 are valid token ids, attention-mask values and indices for any model.
            arrays[info.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return SampleSet(arrays, None, "synthetic samples", fixed_batch=batch)
