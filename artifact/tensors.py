"""The tensor signature: one model input or output (name, numpy dtype, shape with named dynamic dims).

The one definition of the idea for the whole pipeline: compress writes it into the manifest, the
golden check and the agent's request validation read it, and the agent builds it from the
onnxruntime session it loads. A dynamic dimension is always a name (``"batch"``), a fixed one a
non-negative int, so "is this dim free?" is one ``isinstance`` everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgectl.artifact.errors import ArtifactError, ManifestError

Dim = int | str

# onnxruntime and ONNX name element types as "tensor(float)"; numpy names them "float32".
ONNX_TO_NUMPY: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


class UnsupportedTensorTypeError(ArtifactError):
    """A model tensor whose element type has no numpy counterpart that edgectl can carry."""


def dynamic_dim_name(index: int) -> str:
    """The name given to an unnamed dynamic dimension at ``index`` (``d0``, ``d1``, …)."""
    return f"d{index}"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name, shape (dynamic dims are names, fixed dims ints)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def batched(self) -> bool:
        """True when the first dimension is dynamic, so requests can be stacked along it."""
        return bool(self.shape) and isinstance(self.shape[0], str)

    def accepts(self, shape: Sequence[int]) -> bool:
        """True when an array of ``shape`` fits: same rank, and every fixed dim equal."""
        return len(shape) == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    def wire_shape(self) -> list[int]:
        """The shape with -1 for each dynamic dim, as KServe V2 metadata and error messages write it."""
        return [d if isinstance(d, int) else -1 for d in self.shape]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> TensorSpec:
        """Read the manifest's JSON form; ManifestError names the bad field (``where``: its place)."""
        for key, typ in (("name", str), ("dtype", str), ("shape", list)):
            if key not in obj:
                raise ManifestError(f"{where}: missing field {key!r}")
            if not isinstance(obj[key], typ):
                raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(obj[key]).__name__})")
        for dim in obj["shape"]:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)) or (isinstance(dim, int) and dim < 0):
                raise ManifestError(f"{where}: shape dims must be non-negative ints or names, got {dim!r}")
        return cls(obj["name"], obj["dtype"], tuple(obj["shape"]))

    @classmethod
    def from_onnx(cls, name: str, onnx_type: str, shape: Sequence[int | str | None] | None) -> TensorSpec:
        """From ONNX/onnxruntime terms: ``tensor(float)`` and dims that may be None or negative (unknown)."""
        dtype = ONNX_TO_NUMPY.get(onnx_type)
        if dtype is None:
            raise UnsupportedTensorTypeError(
                f"tensor {name!r} has type {onnx_type}, which edgectl cannot carry"
            )
        dims: list[Dim] = [
            d if isinstance(d, str) and d else d if isinstance(d, int) and d >= 0 else dynamic_dim_name(i)
            for i, d in enumerate(shape or ())
        ]
        return cls(name, dtype, tuple(dims))

    @classmethod
    def from_node_arg(cls, arg: Any) -> TensorSpec:
        """From an onnxruntime ``NodeArg`` (``session.get_inputs()`` items: name, type, shape)."""
        return cls.from_onnx(arg.name, arg.type, arg.shape)
