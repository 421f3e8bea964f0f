"""KServe V2 tensors <-> numpy, at one seam: nothing else in the agent touches proto tensors.

Requests may carry data in ``raw_input_contents`` (what tritonclient sends) or in the typed
``contents`` fields (what JSON-minded clients send); responses always use raw contents, which
every V2 client reads.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from edgectl.agent.errors import InvalidInputError
from edgectl.protos.inference import grpc_predict_v2_pb2 as pb

Array = npt.NDArray[np.generic]

V2_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2 = {dt: name for name, dt in V2_TO_NUMPY.items()}
# Which typed field of InferTensorContents carries each datatype (FP16 has none: raw only).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


_V2_NAMES: dict[object, str] = {}  # dtype (or its name) -> V2 name: the request path asks every call


def v2_datatype(dtype: np.dtype[np.generic] | str) -> str:
    """The V2 datatype name of a numpy dtype (str and bytes arrays are BYTES)."""
    known = _V2_NAMES.get(dtype)
    if known is not None:
        return known
    name = _v2_datatype(dtype)
    _V2_NAMES[dtype] = name
    return name


def _v2_datatype(dtype: np.dtype[np.generic] | str) -> str:
    dt = np.dtype(dtype)
    if dt.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dt]
    except KeyError:
        raise InvalidInputError(f"numpy dtype {dt} has no KServe V2 datatype") from None


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of a V2 datatype name; InvalidInputError names the ones we accept."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInputError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}"
        ) from None


def element_count(shape: Sequence[int], name: str) -> int:
    """Elements of ``shape`` (Python ints: a declared 10^12 cannot overflow)."""
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def deserialize_bytes(raw: bytes, count: int, name: str) -> Array:
    """V2 raw BYTES (4-byte little-endian length, then the bytes, per element) as an object array."""
    # Stop at ``count`` elements: a stream of empty elements must not become millions of objects.
    items: list[bytes] = []
    pos = 0
    while pos < len(raw) and len(items) <= count:
        if pos + 4 > len(raw):
            raise InvalidInputError(f"input {name!r}: BYTES element length prefix is cut short")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise InvalidInputError(f"input {name!r}: BYTES element runs past the end of the data")
        items.append(raw[pos : pos + length])
        pos += length
    if len(items) != count or pos != len(raw):
        raise InvalidInputError(f"input {name!r}: BYTES data does not hold exactly {count} elements")
    out = np.empty(count, dtype=np.object_)
    out[:] = items
    return out


def serialize_bytes(array: Array) -> bytes:
    """V2 raw BYTES: each element as a 4-byte little-endian length and its bytes."""
    out = bytearray()
    for item in array.ravel():
        data = item.encode() if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def _decode_raw(raw: bytes, datatype: str, shape: list[int], name: str) -> Array:
    count = element_count(shape, name)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count, name).reshape(shape)
    dtype = numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {name!r}: {len(raw)} bytes of raw data, expected {expected} ({datatype} x shape {shape})"
        )
    return np.ndarray(shape, dtype, raw)  # a read-only view of ``raw``, whose size was just checked


def _decode_typed(tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> Array:
    name, datatype = tensor.name, tensor.datatype
    dtype = numpy_dtype(datatype)
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} has no typed contents field; send raw contents")
    values = getattr(tensor.contents, field)
    count = element_count(shape, name)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: {len(values)} values in contents.{field}, expected {count} for shape {shape}"
        )
    if datatype == "BYTES":
        return np.array(list(values), dtype=np.object_).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def decode_request(request: pb.ModelInferRequest) -> dict[str, Array]:
    """The request's inputs as numpy arrays keyed by name; InvalidInputError says what is wrong."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in order"
        )
    out: dict[str, Array] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise InvalidInputError(f"input {tensor.name!r} appears twice")
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInputError(f"input {tensor.name!r} has both raw and typed contents; send one")
            out[tensor.name] = _decode_raw(raw[i], tensor.datatype, shape, tensor.name)
        else:
            out[tensor.name] = _decode_typed(tensor, shape)
    return out


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, Array],
    requested: Sequence[str] = (),
    parameters: Mapping[str, str] | None = None,
) -> pb.ModelInferResponse:
    """A ModelInferResponse with raw output contents; only ``requested`` outputs when given."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    raw = response.raw_output_contents
    for name in requested or outputs:
        array = np.asarray(outputs[name])
        datatype = v2_datatype(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        # tobytes() writes C order whatever the array's layout: no ascontiguousarray copy first.
        raw.append(serialize_bytes(array) if datatype == "BYTES" else array.tobytes())
    return response


def encode_request(
    model_name: str,
    inputs: Mapping[str, Array],
    *,
    typed: bool = False,
    request_id: str = "",
    outputs: Sequence[str] = (),
) -> pb.ModelInferRequest:
    """A ModelInferRequest from numpy arrays: raw contents, or typed contents with ``typed``."""
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = v2_datatype(array.dtype)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if typed:
            field = TYPED_FIELD.get(datatype)
            if field is None:
                raise InvalidInputError(f"{datatype} cannot be sent as typed contents")
            values = array.ravel().tolist()
            getattr(tensor.contents, field).extend(values)
        elif datatype == "BYTES":
            request.raw_input_contents.append(serialize_bytes(array))
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_response(response: pb.ModelInferResponse) -> dict[str, Array]:
    """The response's outputs as numpy arrays (raw or typed contents)."""
    out: dict[str, Array] = {}
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if i < len(raw):
            out[tensor.name] = _decode_raw(raw[i], tensor.datatype, shape, tensor.name)
        else:
            out[tensor.name] = _decode_typed(tensor, shape)  # type: ignore[arg-type]
    return out


def response_parameters(response: pb.ModelInferResponse) -> dict[str, object]:
    """The response's parameters as plain Python values."""
    out: dict[str, object] = {}
    for key, param in response.parameters.items():
        choice = param.WhichOneof("parameter_choice")
        if choice:
            out[key] = getattr(param, choice)
    return out
