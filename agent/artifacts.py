"""Artifacts on the device's disk: staged from the chunk store, verified, installed, smoke-tested.

Layout under the data dir: ``chunks/`` (the content-addressed chunk store), ``staging/`` (one
directory per install in progress; anything here after a crash is garbage), ``artifacts/<hex>/``
(complete, verified bundles; a directory appears here only by an atomic rename from staging).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgectl.agent.errors import ModelLoadError, RefusedError, SmokeTestError
from edgectl.agent.runtime import LoadedModel, SessionSettings, load_model
from edgectl.agent.state import Installed
from edgectl.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ArtifactError,
    LocalBlobStore,
    Manifest,
    ManifestError,
    TrustStore,
    VerifiedArtifact,
    VerifiedManifest,
    all_chunk_digests,
    golden_matches,
    load_artifact,
    reassemble_file,
    sha256_digest,
)
from edgectl.durable import fsync_dir

log = logging.getLogger(__name__)


class LocalArtifacts:
    """The agent's artifact directories and chunk store in ``data_dir``."""

    def __init__(self, data_dir: Path, trust: TrustStore) -> None:
        self.data_dir = data_dir
        self.trust = trust
        self.root = data_dir / "artifacts"
        self.staging = data_dir / "staging"
        self.chunks = LocalBlobStore(data_dir / "chunks")
        for d in (self.root, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        # Bundles verified by this process moments ago (install), handed to the next load once.
        self._fresh: dict[str, VerifiedArtifact] = {}
        # A crash mid-stage leaves a partial directory; it was never installed, so it goes.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def dir_for(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def install(self, vm: VerifiedManifest, signature_bytes: bytes) -> Installed:
        """Reassemble the bundle from the chunk store, verifying every chunk, and move it into place."""
        final = self.dir_for(vm.digest)
        installed = Installed(vm.digest, vm.manifest.version, final.name)
        if final.is_dir():
            try:
                self._fresh[vm.digest] = load_artifact(final, self.trust)
                return installed  # an earlier run got this far
            except ArtifactError as exc:
                log.warning("installed copy of %s is damaged (%s); staging it again", vm.digest, exc)
                shutil.rmtree(final, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=final.name[:16] + "-", dir=self.staging))
        try:
            # The one check of this hop (chunk store -> bundle): reassemble_file verifies every chunk
            # as it is written, and the manifest was verified by the caller; the bundle holds
            # nothing else. Hashing the staged bundle again would look at the same bytes twice.
            for entry in vm.manifest.files:
                reassemble_file(self.chunks, entry, work / entry.path)
            (work / MANIFEST_NAME).write_bytes(vm.manifest_bytes)
            (work / SIGNATURE_NAME).write_bytes(signature_bytes)
            os.replace(work, final)
            fsync_dir(self.root)
        except ArtifactError as exc:
            raise RefusedError(f"staged bundle failed verification: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._fresh[vm.digest] = VerifiedArtifact(final.resolve(), vm)
        return installed

    def load(self, installed: Installed) -> VerifiedArtifact:
        """The installed bundle, verified; ArtifactError when damaged.

        Right after ``install`` the bundle is the one just verified and written; any later load
        (a restart, a rollback to the previous version) re-verifies it from disk, since disks rot.
        """
        fresh = self._fresh.pop(installed.digest, None)
        if fresh is not None:
            return fresh
        return load_artifact(self.root / installed.path, self.trust)

    def installed_manifest(self, installed: Installed) -> Manifest:
        """The manifest of an installed bundle, checked against its digest (a small hash, not the bundle)."""
        raw = (self.root / installed.path / MANIFEST_NAME).read_bytes()
        if sha256_digest(raw) != installed.digest:
            raise ManifestError(f"{installed.path}/{MANIFEST_NAME} does not hash to {installed.digest}")
        return Manifest.from_bytes(raw)

    def gc(self, keep: list[Installed]) -> None:
        """Remove artifact dirs and chunks that neither the active nor the previous version uses."""
        keep_dirs = {k.path for k in keep}
        keep_chunks: set[str] = set()
        complete = True
        for k in keep:
            # Only the keep-set is needed, not the files' health: read manifests, hash no bundle.
            try:
                keep_chunks |= all_chunk_digests(self.installed_manifest(k))
            except (ArtifactError, OSError) as exc:
                complete = False
                log.warning("cannot read the manifest of %s (%s); keeping every chunk", k.digest, exc)
        self._fresh = {d: a for d, a in self._fresh.items() if a.root.name in keep_dirs}
        for d in self.root.iterdir():
            if d.name not in keep_dirs:
                shutil.rmtree(d, ignore_errors=True)
        if complete:
            self.chunks.gc(keep_chunks)


def load_and_smoke_test(artifact: VerifiedArtifact, settings: SessionSettings) -> LoadedModel:
    """Create the session and run the golden pair; RefusedError when either fails."""
    m = artifact.manifest
    try:
        model = load_model(
            artifact.model_path, name=m.name, version=m.version, digest=artifact.digest, settings=settings
        )
    except ModelLoadError as exc:
        raise RefusedError(f"model does not load: {exc}") from exc
    try:
        model.input_summary = artifact.input_summary()
    except ManifestError as exc:
        raise RefusedError(f"the calibration summary cannot be read: {exc}") from exc
    inputs, expected = artifact.golden()
    try:
        model.validate(inputs)
        actual = model.run(inputs)
    except Exception as exc:  # any failure on the golden input is a failed smoke test
        raise SmokeTestError(f"smoke test: the model fails on its golden input: {exc}") from exc
    for name, want in expected.items():
        if name not in actual:
            raise SmokeTestError(f"smoke test: output {name!r} is missing")
        ok, why = golden_matches(want, actual[name], m.golden)
        if not ok:
            raise SmokeTestError(f"smoke test failed on output {name!r}: {why}")
    return model
