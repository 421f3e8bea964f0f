"""The artifact catalogue: verified uploads into the blob store, lookups, downloads and deletes.

An artifact is accepted only when its manifest is signed by a key the fleet trusts, every
chunk hashes to its manifest digest as it arrives, and every file reassembles to its size and
sha256. Chunks are blobs keyed by their digest, so a new version stores only what changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator

from edgectl.artifact import (
    BlobStore,
    ChunkRef,
    DigestMismatchError,
    FileEntry,
    Manifest,
    ManifestError,
    SignatureError,
    TrustStore,
    UntrustedKeyError,
    all_chunk_digests,
    chunk_locations,
    file_digest_matches,
    is_digest,
    missing,
    sha256_digest,
    verify_manifest,
)
from edgectl.control_plane.artifact_records import ARTIFACT_COLUMNS, ArtifactRecord, ChunkOut, UploadPlan
from edgectl.control_plane.db import Tx
from edgectl.control_plane.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from edgectl.control_plane.store import StateStore, dumps

log = logging.getLogger(__name__)
ACTIVE_ROLLOUT_STATES = (1, 2, 3, 7)  # pending, running, paused, rolling back


class ArtifactStore:
    """Verified, content-addressed artifacts: manifests in the state store, chunks in the blob store."""

    def __init__(self, store: StateStore, blobs: BlobStore, trust: TrustStore) -> None:
        self.store = store
        self.blobs = blobs
        self.trust = trust
        self._manifests: dict[str, Manifest] = {}
        self._lock = threading.Lock()

    # -- upload -------------------------------------------------------------------------------

    def verify(self, manifest_bytes: bytes, signatures: bytes) -> Manifest:
        """The parsed manifest once its signature by a trusted key checks out."""
        if not manifest_bytes:
            raise InvalidArgument("the request carries no manifest", hint="send manifest.json's bytes")
        try:
            return verify_manifest(manifest_bytes, signatures, self.trust).manifest
        except UntrustedKeyError as exc:
            raise PermissionDenied(str(exc)) from exc
        except (SignatureError, ManifestError) as exc:
            raise InvalidArgument(str(exc)) from exc

    def check_trusted(self, record: ArtifactRecord) -> None:
        """Refuse a stored artifact whose signature no key trusted *now* verifies (keys rotate after upload)."""
        try:
            verify_manifest(record.manifest_bytes, record.signatures, self.trust)
        except UntrustedKeyError as exc:
            raise PermissionDenied(
                f"{record.name}:{record.version} is signed by a key this fleet no longer trusts ({exc})",
                hint="sign a new build with a trusted key and push it, or trust its key again (--trust)",
            ) from exc
        except (SignatureError, ManifestError) as exc:
            raise FailedPrecondition(f"stored artifact {record.digest} no longer verifies: {exc}") from exc

    def plan_upload(self, manifest_bytes: bytes, signatures: bytes) -> UploadPlan:
        """Verify the manifest and answer which chunks to send; records the plan for Upload."""
        manifest = self.verify(manifest_bytes, signatures)
        digest = manifest.digest
        with self.store.tx() as tx:
            if tx.one("SELECT 1 FROM artifacts WHERE digest = ?", (digest,)):
                return UploadPlan(digest, [], True)
            self._check_version_free(tx, manifest, digest)
            tx.execute("DELETE FROM upload_plans WHERE digest = ?", (digest,))
            tx.execute(
                "INSERT INTO upload_plans (digest, manifest, signatures, created_at) VALUES (?, ?, ?, ?)",
                (digest, manifest_bytes, signatures, time.time()),
            )
        return UploadPlan(digest, missing(self.blobs, chunk_locations(manifest)), False)

    @staticmethod
    def _check_version_free(tx: Tx, manifest: Manifest, digest: str) -> None:
        row = tx.one(
            "SELECT digest FROM artifacts WHERE name = ? AND version = ?", (manifest.name, manifest.version)
        )
        if row and row[0] != digest:
            raise FailedPrecondition(
                f"{manifest.name}:{manifest.version} already exists as {row[0]}",
                hint="give the new build a higher version; a version names one artifact for good",
            )

    def planned_manifest(self, digest: str) -> Manifest:
        """The manifest of an upload in progress (or of a committed artifact, for idempotent uploads)."""
        with self.store.tx() as tx:
            row = tx.one("SELECT manifest FROM upload_plans WHERE digest = ?", (digest,))
            if row is None:
                row = tx.one("SELECT manifest FROM artifacts WHERE digest = ?", (digest,))
        if row is None:
            raise FailedPrecondition(
                f"no upload of {digest} is planned", hint="call PlanUpload with the signed manifest first"
            )
        return Manifest.from_bytes(bytes(row[0]))

    def receive_chunk(self, manifest: Manifest, chunk_digest: str, data: bytes, wanted: set[str]) -> None:
        """Store one uploaded chunk after checking it belongs to the manifest and matches its digest."""
        if chunk_digest not in wanted:
            raise InvalidArgument(
                f"chunk {chunk_digest} is not part of {manifest.name}:{manifest.version}",
                hint="send only chunks that PlanUpload listed as missing",
            )
        try:
            # The one check of this hop: the blob store verifies the digest, then writes. No size
            # check first, so the refusal can say what the bytes hash to (gRPC caps the message).
            self.blobs.put(data, expected=chunk_digest)
        except DigestMismatchError as exc:
            raise InvalidArgument(
                f"chunk {chunk_digest} arrived as bytes that hash to {exc.actual}",
                hint="the file changed after the manifest was made; rebuild the artifact and push again",
            ) from exc

    def commit_upload(self, digest: str, uploaded_by: str) -> ArtifactRecord:
        """Accept the planned artifact once every file reassembles to its size and sha256."""
        with self.store.tx() as tx:
            row = tx.one(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE digest = ?", (digest,))
            if row is not None:
                return ArtifactRecord.from_row(row)
            plan = tx.one("SELECT manifest, signatures FROM upload_plans WHERE digest = ?", (digest,))
        if plan is None:
            raise FailedPrecondition(f"no upload of {digest} is planned", hint="call PlanUpload first")
        manifest_bytes, signatures = bytes(plan[0]), bytes(plan[1])
        manifest = self.verify(manifest_bytes, signatures)
        lacking = missing(self.blobs, chunk_locations(manifest))
        if lacking:
            raise FailedPrecondition(
                f"upload of {digest} is incomplete: {len(lacking)} chunk(s) missing",
                hint="call PlanUpload again and send the chunks it lists",
            )
        try:
            self._check_files(manifest)
        except InvalidArgument:
            self._discard_plan(digest, manifest)
            raise
        record = ArtifactRecord(
            digest, manifest.name, manifest.version, manifest_bytes, signatures,
            sum(f.size for f in manifest.files), time.time(), uploaded_by,
            tuple(self._signers(manifest_bytes, signatures)), False,
        )  # fmt: skip
        with self.store.tx() as tx:
            if tx.one("SELECT 1 FROM artifacts WHERE digest = ?", (digest,)):
                return self.get(digest)
            self._check_version_free(tx, manifest, digest)
            tx.execute(
                f"INSERT INTO artifacts ({ARTIFACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.digest, record.name, record.version, record.manifest_bytes, record.signatures,
                 record.total_size, record.uploaded_at, record.uploaded_by, dumps(list(record.key_ids)), 0),
            )  # fmt: skip
            tx.execute("DELETE FROM upload_plans WHERE digest = ?", (digest,))
        log.info(
            "artifact committed", extra={"digest": digest, "artifact": f"{manifest.name}:{manifest.version}"}
        )
        return record

    def _signers(self, manifest_bytes: bytes, signatures: bytes) -> list[str]:
        return list(verify_manifest(manifest_bytes, signatures, self.trust).signers)

    def _check_files(self, manifest: Manifest) -> None:
        # The second look at these bytes, on purpose: chunks were verified one by one as they
        # arrived; this checks the manifest's file digests against its chunk lists, once, so that
        # a signed but inconsistent manifest never enters the fleet (devices check chunks only).
        for entry in manifest.files:
            ok, size, sha = file_digest_matches(entry, lambda c: self.blobs.get(c.digest))
            if not ok:
                raise InvalidArgument(
                    f"{entry.path} reassembles to {size} bytes with sha256 {sha}, "
                    f"but the manifest says {entry.size} bytes with sha256 {entry.sha256}",
                    hint="the manifest does not describe its files; rebuild the artifact",
                )

    def _discard_plan(self, digest: str, manifest: Manifest) -> None:
        with self.store.tx() as tx:
            tx.execute("DELETE FROM upload_plans WHERE digest = ?", (digest,))
        self._gc(all_chunk_digests(manifest))

    # -- lookups ------------------------------------------------------------------------------

    def get(self, digest: str) -> ArtifactRecord:
        with self.store.tx() as tx:
            row = tx.one(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE digest = ?", (digest,))
        if row is None:
            raise NotFound(
                f"artifact {digest} is not in the catalogue", hint="list them with `edgectl artifact ls`"
            )
        return ArtifactRecord.from_row(row)

    def resolve(self, ref: str) -> ArtifactRecord:
        """A digest (or unique digest prefix), ``name:version``, or ``name`` (its newest version)."""
        ref = ref.strip()
        if not ref:
            raise InvalidArgument("no artifact named", hint="pass a digest, NAME:VERSION or NAME")
        with self.store.tx() as tx:
            if ref.startswith("sha256:"):
                if is_digest(ref):
                    rows = tx.all(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE digest = ?", (ref,))
                else:
                    rows = [
                        r
                        for r in tx.all(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts")
                        if str(r[0]).startswith(ref)
                    ]
                    if len(rows) > 1:
                        raise InvalidArgument(
                            f"digest prefix {ref} matches {len(rows)} artifacts; give more of it"
                        )
            else:
                name, sep, version = ref.rpartition(":")
                if sep and version.isdigit():
                    rows = tx.all(
                        f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE name = ? AND version = ?",
                        (name, int(version)),
                    )
                elif sep:
                    raise InvalidArgument(f"artifact {ref!r}: the version after ':' must be a number")
                else:
                    rows = tx.all(
                        f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE name = ? ORDER BY version DESC LIMIT 1",
                        (ref,),
                    )
        if not rows:
            raise NotFound(
                f"artifact {ref!r} is not in the catalogue", hint="push it with `edgectl artifact push`"
            )
        return ArtifactRecord.from_row(rows[0])

    def list_artifacts(self, name: str = "", offset: int = 0, limit: int = 100) -> list[ArtifactRecord]:
        with self.store.tx() as tx:
            if name:
                rows = tx.all(
                    f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE name = ? ORDER BY name, version DESC LIMIT ? OFFSET ?",
                    (name, limit, offset),
                )
            else:
                rows = tx.all(
                    f"SELECT {ARTIFACT_COLUMNS} FROM artifacts ORDER BY name, version DESC LIMIT ? OFFSET ?",
                    (limit, offset),
                )
        return [ArtifactRecord.from_row(r) for r in rows]

    def manifest(self, digest: str) -> Manifest:
        """The parsed manifest of a committed artifact (cached: artifacts never change)."""
        with self._lock:
            cached = self._manifests.get(digest)
        if cached is None:
            cached = Manifest.from_bytes(self.get(digest).manifest_bytes)
            with self._lock:
                self._manifests[digest] = cached
        return cached

    # -- download -----------------------------------------------------------------------------

    def download_file(self, digest: str, path: str, offset: int) -> Iterator[ChunkOut]:
        """One file of the artifact from ``offset``, in chunk-sized pieces with their sha256."""
        manifest = self.manifest(digest)
        try:
            entry = manifest.file(path)
        except ManifestError as exc:
            raise InvalidArgument(f"artifact {digest} has no file {path!r}") from exc
        if not 0 <= offset <= entry.size:
            raise InvalidArgument(f"offset {offset} is outside {path} ({entry.size} bytes)")
        return self._file_pieces(entry.path, entry.chunks, offset)

    def _file_pieces(self, path: str, chunks: tuple[ChunkRef, ...], offset: int) -> Iterator[ChunkOut]:
        for chunk in chunks:
            c_offset, c_size, c_digest = chunk.offset, chunk.size, chunk.digest
            if c_offset + c_size <= offset:
                continue
            data = self.blobs.get(c_digest)
            if offset > c_offset:
                # A resumed file starts inside a chunk: the piece is a new byte string, so it needs
                # its own digest for the receiver to check. Whole chunks carry the manifest's.
                data = data[offset - c_offset :]
                c_offset = offset
                c_digest = sha256_digest(data)
            yield ChunkOut(path, c_offset, c_digest, data)

    def download_chunks(self, digest: str, chunk_digests: list[str]) -> Iterator[ChunkOut]:
        """The listed chunks of the artifact, each whole with its digest; unknown ones are refused first."""
        wanted, where = self.requested_chunks(digest, chunk_digests)
        return self._chunk_pieces(where, wanted)

    def requested_chunks(
        self, digest: str, chunk_digests: Iterable[str]
    ) -> tuple[list[str], dict[str, tuple[ChunkRef, FileEntry]]]:
        """(the asked chunks once each, in the asked order; the artifact's chunk index); refuses
        with InvalidArgument, before any chunk is read, a chunk the artifact does not have."""
        where = self.chunk_index(digest)
        wanted = list(dict.fromkeys(chunk_digests))  # a chunk named twice is served once
        unknown = [d for d in wanted if d not in where]
        if unknown:
            raise InvalidArgument(
                f"{len(unknown)} requested chunk(s) are not part of artifact {digest}, e.g. {unknown[0]}",
                hint="ask only for chunks the manifest lists",
            )
        return wanted, where

    def _chunk_pieces(
        self, where: dict[str, tuple[ChunkRef, FileEntry]], chunk_digests: list[str]
    ) -> Iterator[ChunkOut]:
        # Loaded one at a time as the caller consumes them: a request never holds them all.
        for d in chunk_digests:
            chunk, entry = where[d]
            yield ChunkOut(entry.path, chunk.offset, d, self.blobs.get(d))

    def chunk_index(self, digest: str) -> dict[str, tuple[ChunkRef, FileEntry]]:
        """Chunk digest -> (the chunk, its file) at its first occurrence in the artifact."""
        return chunk_locations(self.manifest(digest))

    # -- delete -------------------------------------------------------------------------------

    def delete(self, digest: str) -> int:
        """Remove an unreferenced artifact and the chunks no other artifact shares; returns bytes freed."""
        record = self.get(digest)
        with self.store.tx() as tx:
            users = self._referenced_by(tx, digest)
            if users:
                raise FailedPrecondition(
                    f"artifact {record.name}:{record.version} is still used by {', '.join(users[:5])}"
                    + (f" and {len(users) - 5} more" if len(users) > 5 else ""),
                    hint="finish, abort or roll back those rollouts and move those devices first",
                )
            tx.execute("DELETE FROM artifacts WHERE digest = ?", (digest,))
        with self._lock:
            self._manifests.pop(digest, None)
        manifest = Manifest.from_bytes(record.manifest_bytes)
        return self._gc(all_chunk_digests(manifest))

    @staticmethod
    def _referenced_by(tx: Tx, digest: str) -> list[str]:
        marks = ", ".join("?" for _ in ACTIVE_ROLLOUT_STATES)
        users = [
            f"rollout {r[0]}"
            for r in tx.all(
                f"SELECT DISTINCT r.id FROM rollouts r LEFT JOIN rollout_devices d ON d.rollout_id = r.id "
                f"WHERE r.state IN ({marks}) AND (r.artifact_digest = ? OR d.previous_digest = ?) ORDER BY r.id",
                (*ACTIVE_ROLLOUT_STATES, digest, digest),
            )
        ]
        for device_id, desired, models in tx.all("SELECT id, desired, models FROM devices ORDER BY id"):
            if digest in desired or digest in models:
                users.append(f"device {device_id}")
        return users

    def _gc(self, candidates: set[str]) -> int:
        """Delete the candidate chunks that no committed artifact or open upload still lists."""
        with self.store.tx() as tx:
            manifests = [bytes(r[0]) for r in tx.all("SELECT manifest FROM artifacts")]
            manifests += [bytes(r[0]) for r in tx.all("SELECT manifest FROM upload_plans")]
        keep: set[str] = set()
        for raw in manifests:
            keep |= all_chunk_digests(Manifest.from_bytes(raw))
        freed = 0
        for d in sorted(candidates - keep):
            if self.blobs.has(d):
                size = self.blobs.size(d)
                if self.blobs.delete(d):
                    freed += size
        return freed
