"""Property tests of the canonical manifest encoding: one meaning, one byte string, one digest."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgectl.artifact import ManifestError, canonical_bytes, parse_canonical, sha256_digest
from edgectl.artifact.manifest import Manifest

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_round_trip_is_exact(value: Any) -> None:
    data = canonical_bytes(value)
    back = parse_canonical(data)
    assert canonical_bytes(back) == data
    assert back == value or value != value  # (no NaN is generated, so equality holds)


@given(st.dictionaries(st.text(max_size=8), json_scalars, min_size=1, max_size=12), st.randoms())
def test_key_order_does_not_matter(obj: dict[str, Any], rnd: random.Random) -> None:
    items = list(obj.items())
    rnd.shuffle(items)
    assert canonical_bytes(dict(items)) == canonical_bytes(obj)
    assert sha256_digest(canonical_bytes(dict(items))) == sha256_digest(canonical_bytes(obj))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_stay_floats_and_exact(x: float) -> None:
    back = parse_canonical(canonical_bytes({"x": x}))["x"]
    assert isinstance(back, float) and back == x


@given(json_values)
def test_no_insignificant_whitespace(value: Any) -> None:
    data = canonical_bytes(value)
    assert data == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    # Any other spelling of the same value is refused, so no second digest exists for it.
    spaced = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False).encode()
    if spaced != data:
        with pytest.raises(ManifestError, match="canonical"):
            parse_canonical(spaced)


def test_encoding_details() -> None:
    assert (
        canonical_bytes({"b": 1, "a": [1.0, 0.1, 1e-05, "é"]}) == '{"a":[1.0,0.1,1e-05,"é"],"b":1}'.encode()
    )
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ManifestError):
            canonical_bytes({"x": bad})
    with pytest.raises(ManifestError, match="duplicate"):
        parse_canonical(b'{"a":1,"a":1}')
    with pytest.raises(ManifestError, match="NaN"):
        parse_canonical(b'{"a":NaN}')
    with pytest.raises(ManifestError, match="UTF-8"):
        parse_canonical(b'{"a":"\xff"}')
    with pytest.raises(ManifestError, match="canonical"):
        parse_canonical(b'{"b":1,"a":2}')


metrics_strategy = st.fixed_dictionaries(
    {"baseline_quality": st.floats(0, 1), "latency_ms": st.floats(0, 1e4) | st.integers(0, 10**6)},
    optional={"note": st.text(max_size=30), "extra": json_values},
)


@settings(max_examples=50, deadline=None)
@given(recipe=st.dictionaries(st.text(max_size=8), json_values, max_size=4), metrics=metrics_strategy)
def test_manifest_round_trip(recipe: dict[str, Any], metrics: Any) -> None:
    doc = _minimal_manifest()
    doc["recipe"], doc["metrics"] = recipe, metrics
    data = canonical_bytes(doc)
    m = Manifest.from_bytes(data)
    assert m.to_bytes() == data and m.digest == sha256_digest(data)


def test_unknown_top_level_field_is_kept_verbatim_and_a_nested_one_refused() -> None:
    doc = _minimal_manifest()
    doc["surprise"] = {"from": "a newer edgectl", "n": [1, 2.5]}
    data = canonical_bytes(doc)
    m = Manifest.from_bytes(data)
    # Kept, so the bytes (and the digest every signature is over) are exactly what was signed.
    assert m.extensions == {"surprise": doc["surprise"]} and m.to_bytes() == data
    doc = _minimal_manifest()
    doc["golden"]["surprise"] = 1
    with pytest.raises(ManifestError, match="does not know"):
        Manifest.from_bytes(canonical_bytes(doc))
    with pytest.raises(ManifestError, match="own fields"):
        dataclasses.replace(Manifest.from_dict(_minimal_manifest()), extensions={"name": "x"})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("version", "3", "wrong type"),
        ("version", True, "wrong type"),
        ("format", "edgectl.artifact/v9", "unsupported"),
        ("name", "bad name!", "must match"),
        ("source_model_sha256", "xyz", "64 lowercase hex"),
        ("inputs", [{"name": "x", "dtype": "float32", "shape": [-1]}], "non-negative"),
    ],
)
def test_schema_errors_name_the_field(field: str, value: Any, match: str) -> None:
    doc = _minimal_manifest()
    doc[field] = value
    with pytest.raises(ManifestError, match=match):
        Manifest.from_bytes(canonical_bytes(doc))


def test_a_file_cannot_also_be_a_directory() -> None:
    doc = _minimal_manifest()
    sha = "0" * 64
    doc["files"].append({"path": "model.onnx/x", "size": 0, "sha256": sha, "chunks": []})
    with pytest.raises(ManifestError, match="which is a file"):
        Manifest.from_bytes(canonical_bytes(doc))


def test_chunks_must_tile_the_file() -> None:
    doc = _minimal_manifest()
    doc["files"][0]["chunks"][0]["size"] = 3
    with pytest.raises(ManifestError, match="cover"):
        Manifest.from_bytes(canonical_bytes(doc))


def _minimal_manifest() -> dict[str, Any]:
    sha = "0" * 64
    return {
        "format": "edgectl.artifact/v1",
        "name": "m",
        "version": 2,
        "parent_version": 1,
        "created": "2024-01-01T00:00:00Z",
        "producer": {"edgectl_version": "0.1.0", "host": "h"},
        "source_model_sha256": sha,
        "recipe": {},
        "target_profile": "cpu",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 2]}],
        "metrics": {},
        "precision": {},
        "golden": {"file": "golden.npz", "atol": 0.0001, "rtol": 0.001, "min_cosine": None},
        "model_file": "model.onnx",
        "trt_engines": [],
        "engine_build_on_device": True,
        "files": [
            {
                "path": "golden.npz",
                "size": 4,
                "sha256": sha,
                "chunks": [{"offset": 0, "size": 4, "sha256": sha}],
            },
            {"path": "model.onnx", "size": 0, "sha256": sha, "chunks": []},
        ],
    }
