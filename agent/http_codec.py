"""KServe V2 over HTTP/REST <-> numpy: JSON tensors and Triton's binary tensor data extension.

The HTTP half of the codec seam (``codecs`` holds the datatype tables, the header checks and the
gRPC half). A request body is a JSON header, optionally followed by raw tensor bytes: the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input with a
``binary_data_size`` parameter takes that many bytes, in input order. Binary inputs become numpy
arrays over slices of the body (no copy); JSON ``data`` is bounded by ``max_json_bytes``.
Responses carry outputs as JSON ``data`` or, when asked (``binary_data`` on an output,
``binary_data_output`` on the request), as binary after the JSON header.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgectl.agent.codecs import (
    Array,
    deserialize_bytes,
    element_count,
    numpy_dtype,
    serialize_bytes,
    v2_datatype,
)
from edgectl.agent.errors import InvalidInputError
from edgectl.agent.input_check import RequestLimits, TensorHeader
from edgectl.agent.v2_triton import SHARED_MEMORY_REGION, in_shared_memory

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class HttpInput:
    """One input of an HTTP request: its header and where its data is (a body slice or JSON)."""

    header: TensorHeader
    offset: int = 0
    data: Any = None


@dataclass(frozen=True)
class HttpRequest:
    """A parsed HTTP infer request (tensors not yet decoded)."""

    request_id: str
    inputs: tuple[HttpInput, ...]
    outputs: tuple[str, ...]
    binary_outputs: frozenset[str]
    binary_default: bool
    body: bytes


def _flat(values: Any) -> Iterator[Any]:
    for v in values:
        if isinstance(v, list):
            yield from _flat(v)
        else:
            yield v


def _params(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError("'parameters' must be a JSON object")
    return params


def parse_request(body: bytes, header_length: str | None, limits: RequestLimits) -> HttpRequest:
    """Parse the JSON header and locate every input's data; InvalidInputError says what is wrong."""
    if header_length is None:
        hlen = len(body)
    else:
        try:
            hlen = int(header_length)
        except ValueError:
            raise InvalidInputError(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 <= hlen <= len(body):
            raise InvalidInputError(f"{HEADER_LENGTH} {hlen} runs past the body ({len(body)} bytes)")
    if hlen > limits.max_json_bytes:
        raise InvalidInputError(
            f"JSON part of {hlen} bytes exceeds {limits.max_json_bytes}; send large tensors as binary data"
        )
    try:
        doc = json.loads(body[:hlen])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"request JSON does not parse: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInputError("request JSON must be an object with an 'inputs' list")
    offset = hlen
    inputs = []
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError("each input must be an object with a 'name'")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):  # bool is not a dim
            raise InvalidInputError(f"input {item['name']!r}: 'shape' must be a list of integers")
        datatype = str(item.get("datatype", ""))
        params = _params(item)
        if SHARED_MEMORY_REGION in params:
            raise in_shared_memory("input", item["name"], params[SHARED_MEMORY_REGION])
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise InvalidInputError(
                    f"input {item['name']!r}: binary_data_size {size} runs past the body ({len(body)} bytes)"
                )
            inputs.append(HttpInput(TensorHeader(item["name"], datatype, tuple(shape), size), offset))
            offset += size
            continue
        data = item.get("data")
        if not isinstance(data, list):
            raise InvalidInputError(f"input {item['name']!r}: no 'data' list and no binary_data_size")
        count = sum(1 for _ in _flat(data))
        inputs.append(
            HttpInput(TensorHeader(item["name"], datatype, tuple(shape), count, raw=False), data=data)
        )
    if offset != len(body):
        raise InvalidInputError(
            f"{len(body) - offset} bytes after the last binary input; sizes do not add up"
        )
    requested = doc.get("outputs") or []
    if not isinstance(requested, list):
        raise InvalidInputError("'outputs' must be a list of objects with a 'name'")
    binary_default = bool(_params(doc).get("binary_data_output", False))
    outputs, binary = [], set()
    for out in requested:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInputError("each requested output must be an object with a 'name'")
        params = _params(out)
        if SHARED_MEMORY_REGION in params:
            raise in_shared_memory("output", out["name"], params[SHARED_MEMORY_REGION])
        if params.get("classification"):
            raise InvalidInputError(
                f"output {out['name']!r}: the classification extension is not served; "
                "request the output itself and take its top-k"
            )
        outputs.append(out["name"])
        # An output's own binary_data overrides the request's binary_data_output (Triton's rule).
        if params.get("binary_data", binary_default):
            binary.add(out["name"])
    return HttpRequest(
        request_id=str(doc.get("id", "")),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        binary_outputs=frozenset(binary),
        binary_default=binary_default and not outputs,
        body=body,
    )


def _json_array(name: str, datatype: str, data: Any) -> Array:
    """JSON ``data`` as an array of ``datatype``: numbers only (no null, strings or objects),
    booleans only for BOOL, integers only for the integer types; nothing is silently coerced."""
    dtype = numpy_dtype(datatype)
    try:
        found = np.asarray(list(_flat(data)))
        if found.size and not _json_kind_fits(found.dtype.kind, dtype.kind):
            kinds = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}
            raise InvalidInputError(
                f"input {name!r}: data must be {kinds.get(dtype.kind, datatype)} for {datatype}, "
                f"got {_json_kind_name(found)}"
            )
        if found.size and dtype.kind in "iu":
            info = np.iinfo(dtype.name)
            if found.min() < info.min or found.max() > info.max:
                raise InvalidInputError(f"input {name!r}: a value is out of the range of {datatype}")
        return found.astype(dtype, copy=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"input {name!r}: data is not {datatype}: {exc}") from None


def _json_kind_fits(found: str, want: str) -> bool:
    if want == "b":
        return found == "b"
    if want in "iu":
        return found in "iu"
    return found in "iuf"


def _json_kind_name(found: np.ndarray) -> str:
    if found.dtype.kind == "O":
        return "null, objects, mixed or out-of-range values"
    return {"b": "booleans", "f": "fractional numbers", "U": "strings"}.get(
        found.dtype.kind, str(found.dtype)
    )


def _json_strings(name: str, data: Any) -> list[bytes]:
    """JSON ``data`` of a BYTES input: strings only (a number, null or object is not a string, and
    is not silently turned into one)."""
    values = []
    for v in _flat(data):
        if not isinstance(v, str):
            raise InvalidInputError(
                f"input {name!r}: BYTES data must be JSON strings, got {json.dumps(v)[:40]}; "
                "send other bytes as binary data"
            )
        values.append(v.encode())
    return values


def decode_inputs(request: HttpRequest) -> dict[str, Array]:
    """The inputs as numpy arrays: binary ones are views of the body, JSON ones are converted."""
    view = memoryview(request.body)
    out: dict[str, Array] = {}
    for item in request.inputs:
        h = item.header
        count = element_count(h.shape, h.name)
        if h.raw and h.datatype == "BYTES":
            out[h.name] = deserialize_bytes(bytes(view[item.offset : item.offset + h.size]), count, h.name)
        elif h.raw:
            dtype = numpy_dtype(h.datatype)
            out[h.name] = np.frombuffer(view, dtype=dtype, count=count, offset=item.offset)
        elif h.datatype == "BYTES":
            values = _json_strings(h.name, item.data)
            arr = np.empty(len(values), dtype=np.object_)
            arr[:] = values
            out[h.name] = arr
        else:
            out[h.name] = _json_array(h.name, h.datatype, item.data)
        out[h.name] = out[h.name].reshape(h.shape)
    return out


def encode_response(
    model: str,
    version: str,
    request_id: str,
    outputs: Mapping[str, Array],
    binary: Sequence[str] | frozenset[str],
    parameters: Mapping[str, str],
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when all outputs are JSON) of an infer response."""
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "parameters": dict(parameters)}
    if request_id:
        doc["id"] = request_id
    blobs: list[bytes] = []
    entries = []
    for name, value in outputs.items():
        array = np.asarray(value)
        datatype = v2_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            blob = serialize_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [
                v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel()
            ]
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
