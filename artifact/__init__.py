"""The edgectl artifact: a versioned, signed, content-addressed model bundle.

``compress`` builds it (``build_artifact``), the control plane stores it (``BlobStore``),
the agent verifies it (``verify_manifest``, ``load_artifact``) before using any byte.
Light on purpose: numpy, cryptography, pyfastcdc and the standard library (boto3 only for S3).
One job per module (a test keeps this list complete):

- ``manifest``: the manifest schema (frozen dataclasses), versions and anti-rollback order.
- ``tensors``: ``TensorSpec``, the one tensor signature (name, dtype, shape) every part uses.
- ``canonical``: canonical JSON, the one byte encoding of a manifest; digests.
- ``signing``: Ed25519 signatures over the canonical bytes, key ids, the trust store.
- ``keystore``: where the user's default signing key and trusted keys live.
- ``chunking``: content-defined chunking, a manifest's chunk lists, chunk-level transfer helpers.
- ``integrity``: ``verify_chunk``, the one check of a chunk's bytes, and the verified file reader.
- ``builder``: writes a bundle: files, chunks, golden pair, manifest, signature.
- ``verify``: everything checked before use: signature, manifest, paths, every file.
- ``paths``: path safety: a bundle path cannot leave the bundle.
- ``tarball``: the deterministic ``.tar`` form and a reader that refuses unsafe members.
- ``tensors``: the tensor signature (``TensorSpec``), one model input or output.
- ``golden``: the byte-deterministic golden input/output pair and its tolerance check.
- ``blobstore``: content-addressed blob storage: the interface and the local-disk store.
- ``s3store``: the same interface on S3-compatible object storage (boto3, imported lazily).
- ``drift``: the calibration inputs' summary (``input_summary.json`` in the bundle), as compress writes it.
- ``live_sketch``: the device side of drift: live inputs counted into the summary's bins, PSI.
- ``errors``: the named failure of every check.
"""

from __future__ import annotations

from edgectl.artifact.blobstore import BlobStore, LocalBlobStore, UrlBlobStore, missing, open_blob_store
from edgectl.artifact.builder import Artifact, add_signatures, build_artifact, created_now
from edgectl.artifact.canonical import canonical_bytes, is_digest, parse_canonical, sha256_digest
from edgectl.artifact.chunking import (
    AVG_CHUNK,
    MAX_CHUNK,
    MIN_CHUNK,
    all_chunk_digests,
    chunk_bytes,
    chunk_file,
    chunk_locations,
    chunk_sizes,
    chunks_to_fetch,
    put_file_chunks,
    read_chunk,
    read_range,
    reassemble_file,
    shared_bytes,
)
from edgectl.artifact.drift import DriftSummary, summarize_inputs
from edgectl.artifact.errors import (
    ArtifactError,
    BlobNotFoundError,
    BlobStoreError,
    DigestMismatchError,
    KeyFileError,
    ManifestError,
    PathEscapeError,
    RollbackError,
    SignatureError,
    TruncatedError,
    UnlistedFileError,
    UntrustedKeyError,
)
from edgectl.artifact.golden import golden_matches, read_golden, write_golden
from edgectl.artifact.integrity import ChunkSource, file_digest_matches, read_verified, verify_chunk
from edgectl.artifact.keystore import config_dir, default_key_path, default_signing_key, default_trust_store
from edgectl.artifact.live_sketch import LiveSketch
from edgectl.artifact.manifest import (
    FORMAT,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ChunkRef,
    FileEntry,
    GoldenRef,
    Manifest,
    Producer,
    TrtEngine,
    ensure_newer,
    is_newer,
)
from edgectl.artifact.signing import Signature, SigningKey, TrustStore, key_id, public_pem, verify_signatures
from edgectl.artifact.tensors import ONNX_TO_NUMPY, TensorSpec, UnsupportedTensorTypeError, dynamic_dim_name
from edgectl.artifact.verify import (
    VerifiedArtifact,
    VerifiedManifest,
    load_artifact,
    verify_bundle,
    verify_manifest,
    verify_stream,
)

__all__ = [
    "AVG_CHUNK",
    "FORMAT",
    "MANIFEST_NAME",
    "MAX_CHUNK",
    "MIN_CHUNK",
    "ONNX_TO_NUMPY",
    "SIGNATURE_NAME",
    "Artifact",
    "ArtifactError",
    "BlobNotFoundError",
    "BlobStore",
    "BlobStoreError",
    "ChunkRef",
    "ChunkSource",
    "DigestMismatchError",
    "DriftSummary",
    "FileEntry",
    "GoldenRef",
    "KeyFileError",
    "LiveSketch",
    "LocalBlobStore",
    "Manifest",
    "ManifestError",
    "PathEscapeError",
    "Producer",
    "RollbackError",
    "Signature",
    "SignatureError",
    "SigningKey",
    "TensorSpec",
    "TrtEngine",
    "TruncatedError",
    "TrustStore",
    "UnlistedFileError",
    "UnsupportedTensorTypeError",
    "UntrustedKeyError",
    "UrlBlobStore",
    "VerifiedArtifact",
    "VerifiedManifest",
    "add_signatures",
    "all_chunk_digests",
    "build_artifact",
    "canonical_bytes",
    "chunk_bytes",
    "chunk_file",
    "chunk_locations",
    "chunk_sizes",
    "chunks_to_fetch",
    "config_dir",
    "created_now",
    "default_key_path",
    "default_signing_key",
    "default_trust_store",
    "dynamic_dim_name",
    "ensure_newer",
    "file_digest_matches",
    "golden_matches",
    "is_digest",
    "is_newer",
    "key_id",
    "load_artifact",
    "missing",
    "open_blob_store",
    "parse_canonical",
    "public_pem",
    "put_file_chunks",
    "read_chunk",
    "read_golden",
    "read_range",
    "read_verified",
    "reassemble_file",
    "sha256_digest",
    "shared_bytes",
    "summarize_inputs",
    "verify_bundle",
    "verify_chunk",
    "verify_manifest",
    "verify_signatures",
    "verify_stream",
    "write_golden",
]
