"""Artifacts on the device's disk: staged from the chunk store, verified, installed, smoke-tested.

Layout under the data dir: ``chunks/`` (the content-addressed chunk store), ``staging/`` (one
directory per install in progress; anything here after a crash is garbage), ``artifacts/<hex>/``
(complete, verified bundles; a directory appears here only by an atomic rename from staging).
"""

from __future__ import annotations

import contextlib
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
    TrustStore,
    VerifiedArtifact,
    VerifiedManifest,
    all_chunk_digests,
    golden_matches,
    load_artifact,
    reassemble_file,
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
        # A crash mid-stage leaves a partial directory; it was never installed, so it goes.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def dir_for(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def install(self, vm: VerifiedManifest, signature_bytes: bytes) -> Installed:
        """Reassemble the bundle from the chunk store, verify it whole, and move it into place."""
        final = self.dir_for(vm.digest)
        installed = Installed(vm.digest, vm.manifest.version, final.name)
        if final.is_dir():
            try:
                load_artifact(final, self.trust)
                return installed  # an earlier run got this far
            except ArtifactError as exc:
                log.warning("installed copy of %s is damaged (%s); staging it again", vm.digest, exc)
                shutil.rmtree(final, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=final.name[:16] + "-", dir=self.staging))
        try:
            for entry in vm.manifest.files:
                reassemble_file(self.chunks, entry, work / entry.path)
            (work / MANIFEST_NAME).write_bytes(vm.manifest_bytes)
            (work / SIGNATURE_NAME).write_bytes(signature_bytes)
            load_artifact(work, self.trust)  # the bundle as a whole, exactly as it will be served
            os.replace(work, final)
            fsync_dir(self.root)
        except ArtifactError as exc:
            raise RefusedError(f"staged bundle failed verification: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return installed

    def load(self, installed: Installed) -> VerifiedArtifact:
        """Re-verify an installed bundle (disks rot) and return it; ArtifactError when damaged."""
        return load_artifact(self.root / installed.path, self.trust)

    def gc(self, keep: list[Installed]) -> None:
        """Remove artifact dirs and chunks that neither the active nor the previous version uses."""
        keep_dirs = {k.path for k in keep}
        keep_chunks: set[str] = set()
        for k in keep:
            with contextlib.suppress(ArtifactError, OSError):
                keep_chunks |= all_chunk_digests(load_artifact(self.root / k.path, self.trust).manifest)
        for d in self.root.iterdir():
            if d.name not in keep_dirs:
                shutil.rmtree(d, ignore_errors=True)
        if keep_chunks or not keep:
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
