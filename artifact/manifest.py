"""The manifest schema: frozen dataclasses that read and write canonical JSON.

The manifest is the artifact: it names every file with its size, sha256 and chunk list, so a
signature over its canonical bytes covers the whole bundle. Versions are positive integers that
only grow (``is_newer``), so anti-rollback is one comparison.

Forward compatibility: a top-level field this edgectl does not know is an optional extension
from a newer one. It is kept verbatim in ``extensions`` (so the bytes re-encode exactly and the
signature still covers it) and otherwise ignored. A change an older reader must not ignore
changes ``format`` instead, which older readers refuse by name. New data that agents of earlier
releases must be able to skip goes into a file of the bundle (``files`` lists it, digest and all),
not into a new field: releases before this rule refuse any unknown field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, cast

from edgectl.artifact.canonical import canonical_bytes, is_hex64, parse_canonical, sha256_digest
from edgectl.artifact.errors import ManifestError, RollbackError
from edgectl.artifact.paths import check_relpath
from edgectl.artifact.tensors import TensorSpec

FORMAT = "edgectl.artifact/v1"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
Precision = Literal["int8", "fp16", "fp32"]
PRECISIONS: frozenset[str] = frozenset({"int8", "fp16", "fp32"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
T = TypeVar("T")


def _req(obj: dict[str, Any], key: str, typ: type[T] | tuple[type, ...], where: str) -> T:
    if key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    val = obj[key]
    # bool is an int in Python; a version or size of `true` is a schema error, not 1.
    if not isinstance(val, typ) or (isinstance(val, bool) and typ is not bool):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(val).__name__})")
    return cast(T, val)


def _opt(obj: dict[str, Any], key: str, typ: type[T] | tuple[type, ...], where: str) -> T | None:
    return None if obj.get(key) is None else _req(obj, key, typ, where)


def check_version(version: object, what: str = "version") -> int:
    """Return ``version`` if it is a positive integer, else raise ManifestError."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{what} must be a positive integer, got {version!r}")
    return version


def is_newer(a: int, b: int | None) -> bool:
    """True when version ``a`` may replace ``b`` (``None``: nothing installed yet)."""
    check_version(a)
    return b is None or a > check_version(b)


def ensure_newer(candidate: int, current: int | None, *, name: str = "artifact") -> None:
    """Raise RollbackError unless ``candidate`` is newer than ``current`` (anti-rollback)."""
    if not is_newer(candidate, current):
        raise RollbackError(
            f"{name} version {candidate} is not newer than installed version {current}",
            hint="publish a new version instead of re-using an old number",
        )


@dataclass(frozen=True)
class ChunkRef:
    """One content-defined chunk of a file: where it sits and what it hashes to."""

    offset: int
    size: int
    sha256: str

    @property
    def digest(self) -> str:
        """The chunk's blob-store key, ``sha256:<hex>``."""
        return "sha256:" + self.sha256

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str) -> ChunkRef:
        sha = _req(obj, "sha256", str, where)
        if not is_hex64(sha):
            raise ManifestError(f"{where}: sha256 must be 64 lowercase hex characters")
        return cls(_req(obj, "offset", int, where), _req(obj, "size", int, where), sha)


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle: relative POSIX path, size, sha256 and its chunks in order."""

    path: str
    size: int
    sha256: str
    chunks: tuple[ChunkRef, ...]

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": [c.to_dict() for c in self.chunks],
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> FileEntry:
        path = check_relpath(_req(obj, "path", str, "files[]"))
        where = f"files[{path}]"
        sha = _req(obj, "sha256", str, where)
        if not is_hex64(sha):
            raise ManifestError(f"{where}: sha256 must be 64 lowercase hex characters")
        size = _req(obj, "size", int, where)
        raw_chunks = _req(obj, "chunks", list, where)
        chunks = tuple(ChunkRef.from_dict(c, f"{where}.chunks") for c in raw_chunks if isinstance(c, dict))
        if len(chunks) != len(raw_chunks):
            raise ManifestError(f"{where}: every chunk must be a JSON object")
        entry = cls(path, size, sha, chunks)
        entry.check_chunk_cover()
        return entry

    def check_chunk_cover(self) -> None:
        """Chunks must tile the file exactly: contiguous, non-empty, summing to its size."""
        pos = 0
        for c in self.chunks:
            if c.offset != pos or c.size <= 0:
                raise ManifestError(f"files[{self.path}]: chunk at offset {c.offset} does not follow {pos}")
            pos += c.size
        if pos != self.size or self.size < 0:
            raise ManifestError(f"files[{self.path}]: chunks cover {pos} bytes but the file has {self.size}")


@dataclass(frozen=True)
class GoldenRef:
    """The golden input/output pair for the on-device smoke test, and how close is close enough."""

    file: str = "golden.npz"
    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "atol": self.atol, "rtol": self.rtol, "min_cosine": self.min_cosine}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> GoldenRef:
        num = (int, float)
        return cls(
            file=_req(obj, "file", str, "golden"),
            atol=_req(obj, "atol", num, "golden"),
            rtol=_req(obj, "rtol", num, "golden"),
            min_cosine=_opt(obj, "min_cosine", num, "golden"),
        )


@dataclass(frozen=True)
class TrtEngine:
    """A prebuilt TensorRT engine and the exact platform it was built for."""

    file: str
    device_class: str
    trt_version: str
    compute_capability: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "device_class": self.device_class,
            "trt_version": self.trt_version,
            "compute_capability": self.compute_capability,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> TrtEngine:
        w = "trt_engines[]"
        return cls(
            _req(obj, "file", str, w),
            _req(obj, "device_class", str, w),
            _req(obj, "trt_version", str, w),
            _req(obj, "compute_capability", str, w),
        )


# Well-known metric keys and their JSON types; anything else is kept as free-form JSON.
METRIC_TYPES: dict[str, tuple[type, ...]] = {
    "quality_metric": (str,),
    "baseline_quality": (int, float),
    "compressed_quality": (int, float),
    "baseline_latency_ms": (int, float),
    "latency_ms": (int, float),
    "baseline_size_bytes": (int,),
    "size_bytes": (int,),
}


def check_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Validate the well-known metric keys' types; return the dict unchanged."""
    for key, typ in METRIC_TYPES.items():
        val = metrics.get(key)
        if val is not None and (isinstance(val, bool) or not isinstance(val, typ)):
            raise ManifestError(f"metrics.{key} must be {'/'.join(t.__name__ for t in typ)}, got {val!r}")
    return metrics


@dataclass(frozen=True)
class Producer:
    """Who made the artifact: edgectl's version and the host it ran on."""

    edgectl_version: str
    host: str

    def to_dict(self) -> dict[str, Any]:
        return {"edgectl_version": self.edgectl_version, "host": self.host}


@dataclass(frozen=True)
class Manifest:
    """The signed description of one artifact version; its canonical bytes are its identity."""

    name: str
    version: int
    created: str
    producer: Producer
    source_model_sha256: str
    recipe: dict[str, Any]
    target_profile: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metrics: dict[str, Any]
    precision: dict[str, str]
    golden: GoldenRef
    files: tuple[FileEntry, ...]
    model_file: str = "model.onnx"
    parent_version: int | None = None
    trt_engines: tuple[TrtEngine, ...] = ()
    engine_build_on_device: bool = True
    format: str = field(default=FORMAT)
    # Top-level fields of a newer edgectl, kept verbatim (signed, re-encoded) and not acted on.
    extensions: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-field checks that the per-field parsing cannot see."""
        known = set(_KNOWN_FIELDS) & set(self.extensions)
        if known:
            raise ManifestError(f"extensions may not hold the manifest's own fields {sorted(known)}")
        if self.format != FORMAT:
            raise ManifestError(f"unsupported artifact format {self.format!r} (this edgectl reads {FORMAT})")
        if not _NAME_RE.match(self.name):
            raise ManifestError(f"artifact name {self.name!r} must match {_NAME_RE.pattern}")
        check_version(self.version)
        if self.parent_version is not None and not is_newer(self.version, self.parent_version):
            raise ManifestError(f"version {self.version} must be newer than parent {self.parent_version}")
        if not is_hex64(self.source_model_sha256):
            raise ManifestError("source_model_sha256 must be 64 lowercase hex characters")
        check_metrics(self.metrics)
        for node, prec in self.precision.items():
            if prec not in PRECISIONS:
                raise ManifestError(f"precision[{node!r}] is {prec!r}; expected one of {sorted(PRECISIONS)}")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ManifestError("files lists the same path twice")
        if paths != sorted(paths):
            raise ManifestError("files must be sorted by path")
        listed = set(paths)
        for p in paths:
            # "a" and "a/b" cannot both be files; refusing it keeps extraction simple and safe.
            parents = {"/".join(p.split("/")[:i]) for i in range(1, p.count("/") + 1)}
            if parents & listed:
                raise ManifestError(
                    f"files lists {p!r} inside {sorted(parents & listed)[0]!r}, which is a file"
                )
        if listed & RESERVED_NAMES:
            raise ManifestError(f"files may not list {sorted(listed & RESERVED_NAMES)}")
        needed = [self.model_file, self.golden.file, *(e.file for e in self.trt_engines)]
        for ref in needed:
            if ref not in listed:
                raise ManifestError(f"manifest refers to {ref!r}, which files does not list")

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; raises ManifestError when the manifest has none."""
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"manifest lists no file {path!r}")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON values, ready for canonical encoding."""
        out: dict[str, Any] = {
            **self.extensions,
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "parent_version": self.parent_version,
            "created": self.created,
            "producer": self.producer.to_dict(),
            "source_model_sha256": self.source_model_sha256,
            "recipe": self.recipe,
            "target_profile": self.target_profile,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "metrics": self.metrics,
            "precision": self.precision,
            "golden": self.golden.to_dict(),
            "model_file": self.model_file,
            "trt_engines": [e.to_dict() for e in self.trt_engines],
            "engine_build_on_device": self.engine_build_on_device,
            "files": [f.to_dict() for f in self.files],
        }
        return out

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: what is hashed, signed and written as manifest.json."""
        return canonical_bytes(self.to_dict())

    @property
    def digest(self) -> str:
        """The artifact's identity, ``sha256:<hex>`` of the canonical manifest bytes."""
        return sha256_digest(self.to_bytes())

    @classmethod
    def from_dict(cls, obj: object) -> Manifest:
        """Build from parsed JSON, raising ManifestError that names the bad field."""
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        w = "manifest"
        prod = _req(obj, "producer", dict, w)
        specs: dict[str, tuple[TensorSpec, ...]] = {}
        for k in ("inputs", "outputs"):
            items = _req(obj, k, list, w)
            if not all(isinstance(t, dict) for t in items):
                raise ManifestError(f"{k}[] must hold JSON objects")
            specs[k] = tuple(TensorSpec.from_dict(t, f"{k}[]") for t in items)
        precision = _req(obj, "precision", dict, w)
        if not all(isinstance(v, str) for v in precision.values()):
            raise ManifestError("precision values must be strings")
        files = _req(obj, "files", list, w)
        engines = _req(obj, "trt_engines", list, w)
        if not all(isinstance(x, dict) for x in (*files, *engines)):
            raise ManifestError("files[] and trt_engines[] must hold JSON objects")
        return cls(
            format=_req(obj, "format", str, w),
            name=_req(obj, "name", str, w),
            version=_req(obj, "version", int, w),
            parent_version=_opt(obj, "parent_version", int, w),
            created=_req(obj, "created", str, w),
            producer=Producer(
                _req(prod, "edgectl_version", str, "producer"), _req(prod, "host", str, "producer")
            ),
            source_model_sha256=_req(obj, "source_model_sha256", str, w),
            recipe=_req(obj, "recipe", dict, w),
            target_profile=_req(obj, "target_profile", str, w),
            inputs=specs["inputs"],
            outputs=specs["outputs"],
            metrics=_req(obj, "metrics", dict, w),
            precision=precision,
            golden=GoldenRef.from_dict(_req(obj, "golden", dict, w)),
            model_file=_req(obj, "model_file", str, w),
            trt_engines=tuple(TrtEngine.from_dict(e) for e in engines),
            engine_build_on_device=_req(obj, "engine_build_on_device", bool, w),
            files=tuple(FileEntry.from_dict(f) for f in files),
            extensions={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse canonical manifest bytes; the result re-encodes to exactly ``data``."""
        manifest = cls.from_dict(parse_canonical(data))
        if manifest.to_bytes() != data:
            # A nested field we do not know would vanish on re-encoding: refuse rather than accept
            # bytes we cannot reproduce (top-level ones are kept in ``extensions``).
            raise ManifestError("manifest has fields this edgectl does not know; upgrade edgectl to read it")
        return manifest


# The top-level fields this edgectl reads (each is a dataclass field of the same name); any other
# is an extension (see the module docstring).
_KNOWN_FIELDS = frozenset(f.name for f in fields(Manifest)) - {"extensions"}
