"""What the control plane keeps of an artifact (ArtifactRecord), what an upload plan answers, and
one piece of a download (ChunkOut). Data only; :mod:`edgectl.control_plane.artifacts` acts on it."""

from __future__ import annotations

from dataclasses import dataclass

from edgectl.control_plane.db import Row
from edgectl.control_plane.store import loads

ARTIFACT_COLUMNS = (
    "digest, name, version, manifest, signatures, total_size, uploaded_at, uploaded_by, key_ids, pinned"
)


@dataclass(frozen=True)
class ArtifactRecord:
    """A committed artifact as the store holds it."""

    digest: str
    name: str
    version: int
    manifest_bytes: bytes
    signatures: bytes
    total_size: int
    uploaded_at: float
    uploaded_by: str
    key_ids: tuple[str, ...]
    pinned: bool

    @classmethod
    def from_row(cls, row: Row) -> ArtifactRecord:
        return cls(
            row[0], row[1], int(row[2]), bytes(row[3]), bytes(row[4]), int(row[5]), float(row[6]),
            row[7], tuple(loads(row[8], [])), bool(row[9]),
        )  # fmt: skip


@dataclass(frozen=True)
class UploadPlan:
    """What PlanUpload answers: the artifact's digest and the chunks the store still lacks."""

    digest: str
    missing_chunks: list[str]
    already_complete: bool


@dataclass(frozen=True)
class ChunkOut:
    """One piece of a download: where it sits in which file, its sha256, its bytes."""

    path: str
    offset: int
    digest: str
    data: bytes
