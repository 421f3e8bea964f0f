"""Building a bundle: copy the files in, chunk them, write golden.npz, the manifest and its signature.

``compress`` calls ``build_artifact``; everything it writes is deterministic for the same
inputs and ``created`` time (which honours ``SOURCE_DATE_EPOCH``, the reproducible-builds convention).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import edgectl
from edgectl.artifact.canonical import DIGEST_PREFIX, canonical_bytes, is_hex64, sha256_digest
from edgectl.artifact.chunking import chunk_file
from edgectl.artifact.drift import SUMMARY_FILE, DriftSummary
from edgectl.artifact.errors import ManifestError
from edgectl.artifact.golden import write_golden
from edgectl.artifact.keystore import default_signing_key
from edgectl.artifact.manifest import (
    MANIFEST_NAME,
    RESERVED_NAMES,
    SIGNATURE_NAME,
    GoldenRef,
    Manifest,
    Producer,
    TrtEngine,
)
from edgectl.artifact.paths import check_relpath
from edgectl.artifact.signing import SigningKey, decode_signatures, encode_signatures
from edgectl.artifact.tarball import write_tar
from edgectl.artifact.tensors import TensorSpec


@dataclass(frozen=True)
class Artifact:
    """A bundle just built (and signed) on this machine."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest_bytes)

    def to_tar(self, tar_path: Path) -> Path:
        """Write the deterministic ``.tar`` of this bundle."""
        return write_tar(self.root, tar_path, [f.path for f in self.manifest.files])


def created_now() -> str:
    """UTC creation time in whole seconds, or ``SOURCE_DATE_EPOCH`` when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hex(sha: str) -> str:
    bare = sha.removeprefix(DIGEST_PREFIX)
    if not is_hex64(bare):
        raise ManifestError(
            f"source_model_sha256 {sha!r} is not a sha256 (64 lowercase hex, 'sha256:' optional)"
        )
    return bare


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ManifestError(
            f"output directory {out_dir} is not empty", hint="choose a new directory or remove it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def build_artifact(
    out_dir: Path,
    *,
    name: str,
    version: int,
    files: Mapping[str, Path],
    input_signature: Sequence[TensorSpec],
    output_signature: Sequence[TensorSpec],
    golden_inputs: Mapping[str, npt.NDArray[np.generic]],
    golden_outputs: Mapping[str, npt.NDArray[np.generic]],
    recipe: Mapping[str, Any],
    target_profile: str,
    metrics: Mapping[str, Any],
    precision_map: Mapping[str, str],
    source_model_sha256: str,
    parent_version: int | None = None,
    signing_key: SigningKey | None = None,
    model_file: str = "model.onnx",
    trt_engines: Sequence[TrtEngine] = (),
    engine_build_on_device: bool = True,
    golden_atol: float = 1e-4,
    golden_rtol: float = 1e-3,
    golden_min_cosine: float | None = None,
    created: str | None = None,
    host: str | None = None,
    input_summary: DriftSummary | None = None,
) -> Artifact:
    """Build and sign a bundle in ``out_dir`` (new or empty) from ``files`` (bundle path -> source file).

    ``files`` must hold ``model_file`` and every engine's file; ``golden.npz`` is written here.
    Without ``signing_key`` the user's default key is used (made on first use). ``input_summary``
    (``summarize_inputs`` of the calibration data) lets agents score input drift; it is written
    as the bundle file ``input_summary.json``, so the manifest lists and signs it like the model.
    """
    _prepare_out(out_dir)
    golden = GoldenRef("golden.npz", golden_atol, golden_rtol, golden_min_cosine)
    sources = dict(files)
    for rel in sources:
        check_relpath(rel)
        if rel in RESERVED_NAMES or rel in (golden.file, SUMMARY_FILE):
            raise ManifestError(f"{rel!r} is written by build_artifact; do not pass it in files")
    for rel, src in sorted(sources.items()):
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)  # a copy, never a link: the bundle must not alias outside files
    write_golden(out_dir / golden.file, golden_inputs, golden_outputs, input_signature, output_signature)
    written = [golden.file]
    if input_summary is not None:
        (out_dir / SUMMARY_FILE).write_bytes(input_summary.to_bytes())
        written.append(SUMMARY_FILE)
    entries = tuple(chunk_file(out_dir / rel, rel) for rel in sorted([*sources, *written]))
    manifest = Manifest(
        name=name,
        version=version,
        parent_version=parent_version,
        created=created or created_now(),
        producer=Producer(edgectl.__version__, host if host is not None else socket.gethostname()),
        source_model_sha256=_hex(source_model_sha256),
        # Round-trip through canonical JSON now, so a bad recipe/metric fails the build, not a device.
        recipe=_json_object(recipe, "recipe"),
        target_profile=target_profile,
        inputs=tuple(input_signature),
        outputs=tuple(output_signature),
        metrics=_json_object(metrics, "metrics"),
        precision=dict(sorted(precision_map.items())),
        golden=golden,
        model_file=model_file,
        trt_engines=tuple(sorted(trt_engines, key=lambda e: e.file)),
        engine_build_on_device=engine_build_on_device,
        files=entries,
    )
    manifest_bytes = manifest.to_bytes()
    key = signing_key or default_signing_key()
    (out_dir / MANIFEST_NAME).write_bytes(manifest_bytes)
    (out_dir / SIGNATURE_NAME).write_bytes(encode_signatures(manifest_bytes, [key.sign(manifest_bytes)]))
    return Artifact(out_dir, manifest, manifest_bytes)


def _json_object(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    data = canonical_bytes(dict(value))
    out = json.loads(data)
    if not isinstance(out, dict):
        raise ManifestError(f"{what} must be a JSON object")
    return out


def add_signatures(bundle_dir: Path, keys: Iterable[SigningKey]) -> None:
    """Add signatures to a built bundle (key rotation: old and new key both sign); the digest is unchanged."""
    manifest_bytes = (bundle_dir / MANIFEST_NAME).read_bytes()
    _, existing = decode_signatures((bundle_dir / SIGNATURE_NAME).read_bytes())
    by_id = {s.key_id: s for s in existing}
    for key in keys:
        by_id[key.key_id] = key.sign(manifest_bytes)
    (bundle_dir / SIGNATURE_NAME).write_bytes(encode_signatures(manifest_bytes, by_id.values()))
