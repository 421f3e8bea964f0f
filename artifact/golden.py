"""The golden input/output pair: a byte-deterministic ``.npz`` and its tolerance check.

``numpy.savez`` stamps the current time into its zip entries, which would change the
artifact's digest on every build, so this writes the same zip layout with fixed metadata.
``numpy.load`` reads it as usual (``allow_pickle=False``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgectl.artifact.errors import ManifestError
from edgectl.artifact.manifest import GoldenRef
from edgectl.artifact.tensors import TensorSpec

_EPOCH_1980 = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def _key(kind: str, index: int) -> str:
    return f"{kind}_{index}"


def _check_against(spec: TensorSpec, arr: npt.NDArray[np.generic], kind: str) -> None:
    if arr.dtype != np.dtype(spec.dtype):
        raise ManifestError(f"golden {kind} {spec.name!r} is {arr.dtype}, signature says {spec.dtype}")
    if not spec.accepts(arr.shape):
        raise ManifestError(f"golden {kind} {spec.name!r} has shape {arr.shape}, signature says {spec.shape}")


def write_golden(
    path: Path,
    inputs: Mapping[str, npt.NDArray[np.generic]],
    outputs: Mapping[str, npt.NDArray[np.generic]],
    input_specs: Sequence[TensorSpec],
    output_specs: Sequence[TensorSpec],
) -> None:
    """Write arrays as ``input_<i>``/``output_<i>`` in signature order, checking names, dtypes, shapes."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for kind, given, specs in (("input", inputs, input_specs), ("output", outputs, output_specs)):
        names = [s.name for s in specs]
        if set(given) != set(names):
            raise ManifestError(f"golden {kind}s are {sorted(given)}, signature names {sorted(names)}")
        for i, spec in enumerate(specs):
            arr = np.asarray(given[spec.name])
            _check_against(spec, arr, kind)
            arrays[_key(kind, i)] = arr
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH_1980)
            info.create_system = 3  # "unix" everywhere, so Windows builds give the same bytes
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def read_golden(
    path: Path, input_specs: Sequence[TensorSpec], output_specs: Sequence[TensorSpec]
) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, npt.NDArray[np.generic]]]:
    """Load (inputs, outputs) keyed by tensor name; never unpickles."""
    with np.load(path, allow_pickle=False) as npz:
        ins = {s.name: npz[_key("input", i)] for i, s in enumerate(input_specs)}
        outs = {s.name: npz[_key("output", i)] for i, s in enumerate(output_specs)}
    return ins, outs


def golden_matches(
    expected: npt.NDArray[np.generic], actual: npt.NDArray[np.generic], ref: GoldenRef
) -> tuple[bool, str]:
    """Compare one output against the golden one with the manifest's tolerances; (ok, why)."""
    exp = np.asarray(expected, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if exp.shape != act.shape:
        return False, f"shape {act.shape} != golden {exp.shape}"
    if ref.min_cosine is not None:
        denom = float(np.linalg.norm(exp) * np.linalg.norm(act))
        cos = float(np.dot(exp.ravel(), act.ravel()) / denom) if denom else float(np.array_equal(exp, act))
        return cos >= ref.min_cosine, f"cosine {cos:.6f} (min {ref.min_cosine})"
    diff = float(np.max(np.abs(exp - act))) if exp.size else 0.0
    ok = bool(np.allclose(act, exp, atol=ref.atol, rtol=ref.rtol))
    return ok, f"max abs diff {diff:.3g} (atol {ref.atol}, rtol {ref.rtol})"
