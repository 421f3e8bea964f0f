"""Where the float model comes from: an ONNX file, a .pt2 program, a factory, or an nn.Module.

Torch inputs are exported (dynamo, falling back to TorchScript) with a parity check against
torch before anything else happens; the source digest identifies what the user gave us.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgectl.compress.data import load_npz
from edgectl.compress.errors import BadInputError
from edgectl.compress.graph import load, uses_external_data
from edgectl.compress.package import sha256_file


@dataclass(frozen=True)
class FloatModel:
    """The float ONNX model, the digest of what the user gave, how it was obtained, and the torch module if any."""

    path: Path
    source_sha256: str
    info: dict[str, Any]
    module: Any = None  # the torch.nn.Module it was exported from: recovery training needs it


def _copy_onnx(path: Path, target: Path) -> FloatModel:
    """Copy an ONNX file into the work folder, weights included.

    torch.onnx.export's default (dynamo) exporter writes the weights beside the graph
    (``model.onnx.data``): copying the graph alone would lose them, so such a model is written
    back as one self-contained file (or with its data file beside it past protobuf's 2 GiB),
    and its digest is that of the whole model.
    """
    model = load(path)  # a non-model file, or a missing weights file, fails here with one clear line
    if not uses_external_data(onnx.load(str(path), load_external_data=False)):
        shutil.copyfile(path, target)
        return FloatModel(target, sha256_file(path), {"source": "onnx"})
    try:
        big = model.ByteSize() > 2**31 - 2**20
    except ValueError:  # protobuf may refuse to size a message past 2 GiB
        big = True
    onnx.save_model(model, str(target), save_as_external_data=big, location=target.name + ".data")
    return FloatModel(target, sha256_file(target), {"source": "onnx", "external_data": True})


def acquire_float_model(
    model: str,
    work: Path,
    progress: Callable[[str], None],
    *,
    module: Any = None,
    example: dict[str, np.ndarray] | None = None,
    calib: Path | None = None,
    eval_set: Path | None = None,
    state_dict: Path | None = None,
) -> FloatModel:
    """The float ONNX model in ``work``, the source digest, how it was obtained, and the torch module."""
    target = work / "float.onnx"
    path = Path(model)
    if module is None and not path.is_file() and (":" not in model or model.endswith((".onnx", ".pt2"))):
        raise BadInputError(
            f"model {model} does not exist", hint="pass a .onnx or .pt2 file or package.module:factory"
        )
    if state_dict is not None and (module is not None or path.is_file()):
        # Weights are loaded into what a factory builds; a file or module given whole has its own.
        raise BadInputError(
            f"--state-dict loads weights into a package.module:factory model, and {model} is not one",
            hint="drop --state-dict, or pass the model as package.module:factory",
        )
    if module is None and path.is_file() and path.suffix != ".pt2":
        return _copy_onnx(path, target)
    from edgectl.compress.passes.export import export_module, load_factory, load_program

    names, program = None, None
    if module is None and path.is_file():
        module, names, program = load_program(path)
    elif module is None:
        module = load_factory(model, state_dict)  # a bad factory is named before missing data
    arrays: dict[str, np.ndarray] = dict(example or {})
    for data in (calib, eval_set):
        if data is not None:
            arrays = {**load_npz(data, what="sample")[0], **arrays}
    if not arrays:
        raise BadInputError(
            "a torch model needs sample inputs to export", hint="pass --calib or --eval FILE.npz"
        )
    progress("exporting to ONNX")
    report = export_module(module, arrays, target, names=names, program=program)
    if program is not None:
        digest = sha256_file(path)
    else:
        digest = sha256_file(state_dict) if state_dict else sha256_file(target)
    info = {
        "source": "torch",
        "exporter": report.exporter,
        "parity_max_abs_diff": report.max_abs_diff,
        "parity_min_cosine": report.min_cosine,
        "dynamo_error": report.dynamo_error,
    }
    return FloatModel(target, digest, info, module)
