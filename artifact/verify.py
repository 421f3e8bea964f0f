"""Verification before use: signature, canonical manifest, path safety, every file's size and chunks.

``verify_manifest`` is for a manifest received on its own (over gRPC or MQTT, before any file);
``load_artifact`` checks a whole bundle, directory or ``.tar``, and only then hands it out. File
bytes are checked chunk by chunk through ``integrity.read_verified`` (each byte hashed once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from edgectl.artifact.canonical import sha256_digest
from edgectl.artifact.drift import SUMMARY_FILE, DriftSummary
from edgectl.artifact.errors import (
    DigestMismatchError,
    ManifestError,
    PathEscapeError,
    SignatureError,
    TruncatedError,
    UnlistedFileError,
)
from edgectl.artifact.golden import read_golden
from edgectl.artifact.integrity import read_verified
from edgectl.artifact.manifest import (
    MANIFEST_NAME,
    RESERVED_NAMES,
    SIGNATURE_NAME,
    ChunkRef,
    FileEntry,
    Manifest,
)
from edgectl.artifact.paths import scan_bundle_dir
from edgectl.artifact.signing import TrustStore, verify_signatures
from edgectl.artifact.tarball import safe_members

# A manifest lists chunks, so it grows with the model; 64 MiB is far beyond any real one.
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signature by a trusted key has been checked; its digest is its identity."""

    manifest: Manifest
    manifest_bytes: bytes
    digest: str
    signers: tuple[str, ...]


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes, trust: TrustStore) -> VerifiedManifest:
    """Check the signature over the exact bytes first, then parse; raises SignatureError/ManifestError."""
    signers = verify_signatures(manifest_bytes, signature_bytes, trust)
    manifest = Manifest.from_bytes(manifest_bytes)
    return VerifiedManifest(manifest, manifest_bytes, sha256_digest(manifest_bytes), tuple(signers))


@dataclass(frozen=True)
class VerifiedArtifact:
    """A bundle directory whose every file matched the signed manifest when it was loaded."""

    root: Path
    verified: VerifiedManifest

    @property
    def manifest(self) -> Manifest:
        return self.verified.manifest

    @property
    def digest(self) -> str:
        return self.verified.digest

    def path(self, rel: str) -> Path:
        """Filesystem path of a file the manifest lists."""
        self.manifest.file(rel)
        return self.root / rel

    @property
    def model_path(self) -> Path:
        return self.path(self.manifest.model_file)

    def golden(self) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, npt.NDArray[np.generic]]]:
        """The golden (inputs, outputs) keyed by tensor name."""
        m = self.manifest
        return read_golden(self.path(m.golden.file), m.inputs, m.outputs)

    def input_summary(self) -> DriftSummary | None:
        """The calibration inputs' summary the bundle carries (``drift.SUMMARY_FILE``), or None."""
        if SUMMARY_FILE not in {f.path for f in self.manifest.files}:
            return None
        return DriftSummary.from_bytes(self.path(SUMMARY_FILE).read_bytes())

    def engine_for(self, device_class: str, trt_version: str, compute_capability: str) -> Path | None:
        """The prebuilt TensorRT engine for exactly this platform, or None (build on device)."""
        for e in self.manifest.trt_engines:
            if (e.device_class, e.trt_version, e.compute_capability) == (
                device_class,
                trt_version,
                compute_capability,
            ):
                return self.path(e.file)
        return None


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        block = stream.read(n)
        if not block:
            break
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


def verify_stream(entry: FileEntry, stream: IO[bytes], sink: IO[bytes] | None = None) -> None:
    """Read ``entry``'s bytes chunk by chunk, checking each chunk (``read_verified``) and the length.

    A corrupt chunk is caught when it is read, not after the whole file; ``sink`` gets the bytes.
    """

    def source(c: ChunkRef) -> bytes:
        try:
            data = _read_exact(stream, c.size)
        except (tarfile.ReadError, EOFError, OSError) as exc:
            raise TruncatedError(entry.path, f"cannot read chunk at offset {c.offset}: {exc}") from exc
        if len(data) < c.size:
            got = c.offset + len(data)
            raise TruncatedError(entry.path, f"file ends at byte {got}; manifest says {entry.size}")
        return data

    for data in read_verified(entry, source):
        if sink is not None:
            sink.write(data)
    if stream.read(1):
        raise DigestMismatchError(entry.path, f"file is longer than the {entry.size} bytes the manifest says")


def _compare_listing(manifest: Manifest, present: list[str]) -> None:
    listed = {f.path for f in manifest.files}
    have = set(present) - RESERVED_NAMES
    extra = sorted(have - listed)
    if extra:
        raise UnlistedFileError(extra[0])
    gone = sorted(listed - have)
    if gone:
        raise TruncatedError(gone[0], "file is listed in the manifest but missing from the bundle")


def _read_small_file(path: Path, name: str, missing: type[Exception]) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise missing(f"{name} is missing: this is not a signed edgectl artifact") from exc
    with os.fdopen(fd, "rb") as fh:
        return fh.read(MAX_MANIFEST_BYTES + 1)


def _verify_dir(root: Path, trust: TrustStore) -> VerifiedManifest:
    present = scan_bundle_dir(root)  # first: no link or odd file is ever opened below
    vm = verify_manifest(
        _read_small_file(root / MANIFEST_NAME, MANIFEST_NAME, ManifestError),
        _read_small_file(root / SIGNATURE_NAME, SIGNATURE_NAME, SignatureError),
        trust,
    )
    _compare_listing(vm.manifest, present)
    for entry in vm.manifest.files:
        fd = os.open(root / entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PathEscapeError(entry.path, "only regular files are allowed in a bundle")
            if st.st_size < entry.size:
                raise TruncatedError(entry.path, f"file has {st.st_size} bytes; manifest says {entry.size}")
            verify_stream(entry, fh)
    return vm


def _verify_tar(tar_path: Path, trust: TrustStore, extract_to: Path | None) -> VerifiedManifest:
    source = tar_path.name
    try:
        tf = tarfile.open(tar_path, mode="r:")  # noqa: SIM115 - opened here to map its errors; closed below
    except (tarfile.ReadError, EOFError) as exc:
        raise TruncatedError(source, f"not a readable tar archive ({exc})") from exc
    with tf:
        members = {m.name: m for m in safe_members(tf, source)}
        raw: dict[str, bytes] = {}
        for name, missing in ((MANIFEST_NAME, ManifestError), (SIGNATURE_NAME, SignatureError)):
            if name not in members:
                raise missing(f"{source} has no {name}: it is not a signed edgectl artifact")
            if members[name].size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{name} is {members[name].size} bytes, more than any real manifest")
            fh = tf.extractfile(members[name])
            assert fh is not None  # a regular member always has a file object
            try:
                raw[name] = fh.read()
            except (tarfile.ReadError, EOFError) as exc:
                raise TruncatedError(source, f"{name} is cut short ({exc})") from exc
        vm = verify_manifest(raw[MANIFEST_NAME], raw[SIGNATURE_NAME], trust)
        _compare_listing(vm.manifest, list(members))
        for entry in vm.manifest.files:
            member = members[entry.path]
            if member.size != entry.size:
                cls = TruncatedError if member.size < entry.size else DigestMismatchError
                raise cls(entry.path, f"tar holds {member.size} bytes; manifest says {entry.size}")
            fh = tf.extractfile(member)
            assert fh is not None
            if extract_to is None:
                verify_stream(entry, fh)
                continue
            dest = extract_to / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("xb") as out:
                verify_stream(entry, fh, out)
    if extract_to is not None:
        (extract_to / MANIFEST_NAME).write_bytes(raw[MANIFEST_NAME])
        (extract_to / SIGNATURE_NAME).write_bytes(raw[SIGNATURE_NAME])
    return vm


def verify_bundle(path: Path, trust: TrustStore) -> VerifiedManifest:
    """Verify a bundle directory or ``.tar`` completely without extracting anything."""
    path = Path(path)
    if path.is_dir():
        return _verify_dir(path.resolve(), trust)
    if not path.exists():
        raise ManifestError(f"{path} does not exist", hint="pass an artifact directory or .tar")
    return _verify_tar(path, trust, None)


def load_artifact(path: Path, trust: TrustStore, *, extract_to: Path | None = None) -> VerifiedArtifact:
    """Verify a bundle and return it ready to use; a ``.tar`` is extracted (verified on the way).

    ``extract_to`` must not exist or be empty; by default a new temp directory the caller owns.
    On any failure nothing extracted is left behind.
    """
    path = Path(path)
    if path.is_dir():
        # The root may be a link the caller chose (e.g. ``current -> v3``); links inside may not.
        root = path.resolve()
        return VerifiedArtifact(root, _verify_dir(root, trust))
    if not path.exists():
        raise ManifestError(f"{path} does not exist", hint="pass an artifact directory or .tar")
    made_here = extract_to is None or not extract_to.exists()
    if extract_to is None:
        dest = Path(tempfile.mkdtemp(prefix="edgectl-artifact-"))
    else:
        dest = extract_to
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise ManifestError(
                f"cannot extract into {dest}: it is not empty", hint="choose an empty directory"
            )
    try:
        vm = _verify_tar(path, trust, dest)
    except BaseException:
        if made_here:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in list(dest.iterdir()):
                with contextlib.suppress(OSError):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return VerifiedArtifact(dest, vm)


def read_unverified(path: Path) -> tuple[bytes, bytes | None]:
    """(manifest bytes, signature bytes or None) of a bundle, for display only: nothing is checked.

    Path safety still applies (links are not followed), so inspecting a hostile bundle is safe.
    """
    path = Path(path)
    if path.is_dir():
        path = path.resolve()
        scan_bundle_dir(path)
        manifest = _read_small_file(path / MANIFEST_NAME, MANIFEST_NAME, ManifestError)
        sig_path = path / SIGNATURE_NAME
        return manifest, (
            _read_small_file(sig_path, SIGNATURE_NAME, SignatureError) if sig_path.exists() else None
        )
    if not path.exists():
        raise ManifestError(f"{path} does not exist", hint="pass an artifact directory or .tar")
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 - opened here to map its errors; closed below
    except (tarfile.ReadError, EOFError) as exc:
        raise TruncatedError(path.name, f"not a readable tar archive ({exc})") from exc
    found: dict[str, bytes] = {}
    with tf:
        for m in safe_members(tf, path.name):
            if m.name in RESERVED_NAMES and m.size <= MAX_MANIFEST_BYTES:
                fh = tf.extractfile(m)
                assert fh is not None
                try:
                    found[m.name] = fh.read()
                except (tarfile.ReadError, EOFError) as exc:
                    raise TruncatedError(path.name, f"{m.name} is cut short ({exc})") from exc
            if len(found) == len(RESERVED_NAMES):
                break
    if MANIFEST_NAME not in found:
        raise ManifestError(f"{path.name} has no {MANIFEST_NAME}: it is not an edgectl artifact")
    return found[MANIFEST_NAME], found.get(SIGNATURE_NAME)
