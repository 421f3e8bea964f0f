"""What one inference request may carry, checked from its headers before any tensor is decoded:
the server's limits, each input's name, datatype, shape, size and batch against the model's
signature (``InputTable``, worked out once per installed version)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgectl.agent.codecs import TYPED_FIELD, Array, element_count, numpy_dtype, v2_datatype
from edgectl.agent.errors import InvalidInputError
from edgectl.artifact import TensorSpec
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one inference request, checked before anything of its size is allocated."""

    max_request_bytes: int = 64 << 20
    # A BYTES element costs a Python object (~40 bytes) however short: count them, not bytes.
    max_bytes_elements: int = 1 << 20
    # JSON numbers become Python objects before numpy sees them: large tensors go binary.
    max_json_bytes: int = 8 << 20


@dataclass(frozen=True)
class TensorHeader:
    """What a request says about one input before its data is decoded: name, datatype, shape and
    how much data it carries (bytes for raw/binary data, values for typed/JSON contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    size: int
    raw: bool = True


class _ShapePattern:
    """The shapes a signature's shape admits, checked with little Python: the usual patterns (all
    dims fixed, or a free first dimension and the rest fixed) are one tuple comparison."""

    def __init__(self, dims: Sequence[int | str]) -> None:
        self.rank = len(dims)
        self.fixed = tuple((i, d) for i, d in enumerate(dims) if isinstance(d, int))
        sizes = tuple(d for _, d in self.fixed)
        self.whole = sizes if len(sizes) == self.rank else None
        self.tail = sizes if self.rank and len(sizes) == self.rank - 1 and isinstance(dims[0], str) else None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Same rank, every fixed dim equal, no negative dim."""
        if self.whole is not None:
            return shape == self.whole
        if len(shape) != self.rank:
            return False
        if self.tail is not None:
            return shape[1:] == self.tail and shape[0] >= 0
        return all(shape[i] == d for i, d in self.fixed) and min(shape) >= 0


class InputTable:
    """A model version's inputs as the request path checks them, worked out once when the version
    is installed: each name's V2 datatype, item size and shape pattern, and the largest batch a
    request may carry (``max_batch_size``, as its ModelConfig advertises; 0: no batch dimension)."""

    def __init__(self, model: str, specs: Sequence[TensorSpec], max_batch_size: int = 0) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.specs = {s.name: s for s in specs}
        self._names = set(self.specs)
        self.datatypes = {s.name: v2_datatype(s.dtype) for s in specs}
        # name -> (V2 datatype, numpy dtype, shape pattern); empty for a model with a BYTES input,
        # whose requests always take the general path (elements counted, not sized).
        self._exact: dict[str, tuple[str, np.dtype[np.generic], _ShapePattern]] = {}
        if "BYTES" not in self.datatypes.values():
            self._exact = {
                s.name: (self.datatypes[s.name], numpy_dtype(self.datatypes[s.name]), _ShapePattern(s.shape))
                for s in specs
            }

    def check(self, headers: Sequence[TensorHeader], limits: RequestLimits) -> None:
        """Refuse a request whose inputs cannot match the model's signature, from the headers alone:
        names, datatypes, shapes, element counts and data sizes, before any tensor is decoded."""
        model = self.model
        seen: set[str] = set()
        for h in headers:
            if h.name in seen:
                raise InvalidInputError(f"input {h.name!r} appears twice")
            seen.add(h.name)
        if seen != self._names:
            raise InvalidInputError(f"model {model!r} takes inputs {sorted(self._names)}, got {sorted(seen)}")
        for h in headers:
            spec, want = self.specs[h.name], self.datatypes[h.name]
            if h.datatype != want:
                raise InvalidInputError(
                    f"input {h.name!r} of model {model!r} must be {spec.dtype} (V2 {want}), got {h.datatype}"
                )
            if not spec.accepts(h.shape):
                raise InvalidInputError(
                    f"input {h.name!r} of model {model!r} must have shape {spec.wire_shape()}, got {list(h.shape)}"
                )
            if self.max_batch_size and h.shape[0] > self.max_batch_size:
                raise self.batch_too_large()
            count = element_count(h.shape, h.name)
            if not h.raw:
                if h.size != count:
                    raise InvalidInputError(
                        f"input {h.name!r}: {h.size} values, expected {count} for shape {list(h.shape)}"
                    )
            elif want == "BYTES":
                if count > limits.max_bytes_elements:
                    raise InvalidInputError(
                        f"input {h.name!r}: {count} BYTES elements exceed this server's limit of "
                        f"{limits.max_bytes_elements}; split the request"
                    )
                if 4 * count > h.size:
                    raise InvalidInputError(
                        f"input {h.name!r}: {h.size} bytes cannot hold {count} BYTES elements "
                        "(4-byte length prefix each)"
                    )
            elif h.size != count * numpy_dtype(want).itemsize:
                raise InvalidInputError(
                    f"input {h.name!r}: {h.size} bytes of data, expected {count * numpy_dtype(want).itemsize} "
                    f"({want} x shape {list(h.shape)})"
                )

    def batch_too_large(self) -> InvalidInputError:
        """The refusal of a request whose batch exceeds ``max_batch_size``, in Triton's words."""
        n = self.max_batch_size
        return InvalidInputError(
            f"inference request batch-size must be <= {n} for '{self.model}'; "
            f"split the request into batches of at most {n}"
        )

    def decode_exact(self, request: pb.ModelInferRequest) -> dict[str, Array] | None:
        """The inputs of a gRPC request with raw contents that fits the signature exactly, as numpy
        views of the received bytes (no copy); None for anything else (typed contents, BYTES, any
        mismatch), which then goes through ``check`` and ``decode_request`` to be served or
        refused with its reason. Each input is checked before it is viewed."""
        raw, inputs = request.raw_input_contents, request.inputs
        if len(raw) != len(inputs) or len(inputs) != len(self.specs):
            return None
        out: dict[str, Array] = {}
        for tensor, data in zip(inputs, raw, strict=True):
            name = tensor.name
            want = self._exact.get(name)
            if want is None or name in out or tensor.datatype != want[0] or tensor.HasField("contents"):
                return None
            _, dtype, pattern = want
            shape = tuple(tensor.shape)
            if not pattern.fits(shape) or (self.max_batch_size and shape[0] > self.max_batch_size):
                return None
            if len(data) != math.prod(shape) * dtype.itemsize:
                return None
            # A read-only view of the received bytes: one call (frombuffer + reshape cost ~5x more).
            out[name] = np.ndarray(shape, dtype, data)
        return out


def request_headers(request: pb.ModelInferRequest) -> list[TensorHeader]:
    """The TensorHeaders of a gRPC request (no tensor data is copied)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in order"
        )
    out = []
    for i, t in enumerate(request.inputs):
        shape = tuple(t.shape)
        if raw:
            out.append(TensorHeader(t.name, t.datatype, shape, len(raw[i])))
            continue
        field = TYPED_FIELD.get(t.datatype)
        values = len(getattr(t.contents, field)) if field is not None else 0
        out.append(TensorHeader(t.name, t.datatype, shape, values, raw=False))
    return out
