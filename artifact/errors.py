"""The named failures of the artifact format: every check that protects a device has one.

Each message names the file (or key, or field) at fault and says what to do next, so the
CLI can print it as one line and the agent can report it as an event.
"""

from __future__ import annotations

from edgectl.errors import EdgectlError


class ArtifactError(EdgectlError):
    """Root of every artifact failure: the bundle must not be used."""

    exit_code = 4


class ManifestError(ArtifactError):
    """manifest.json is missing, not canonical JSON, or breaks the schema."""


class SignatureError(ArtifactError):
    """A signature is missing, malformed, or does not verify against the manifest bytes."""


class UntrustedKeyError(SignatureError):
    """The manifest is signed, but by no key in the trust store."""

    def __init__(self, key_ids: list[str], trusted: list[str]) -> None:
        signed = ", ".join(key_ids) or "no key"
        known = ", ".join(trusted) or "none"
        super().__init__(
            f"manifest is signed by {signed}, which is not a trusted key (trusted: {known})",
            hint="add the signer's public key to the trust store (--trust DIR_OR_PEM) if you trust it",
        )
        self.key_ids = key_ids


class DigestMismatchError(ArtifactError):
    """A file's (or chunk's) bytes differ from what the manifest records."""

    def __init__(self, path: str, detail: str, *, expected: str = "", actual: str = "") -> None:
        super().__init__(
            f"{path}: {detail}", hint="the bundle was modified or damaged; fetch it again from its source"
        )
        self.path = path
        self.expected = expected  # the digest the bytes should have had ("" when not known)
        self.actual = actual  # what they hash to ("" when refused before hashing, e.g. by size)


class TruncatedError(ArtifactError):
    """A file, a chunk or the tar itself ends early or is missing."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}", hint="the transfer was cut short; fetch the bundle again")
        self.path = path


class PathEscapeError(ArtifactError):
    """A path could leave the bundle: absolute, '..', a link, a device node, or a duplicate entry."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path!r}: {detail}", hint="refusing an unsafe bundle; do not use it")
        self.path = path


class UnlistedFileError(ArtifactError):
    """The bundle holds a file that the signed manifest does not list."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path}: file is in the bundle but not in the signed manifest",
            hint="remove it or rebuild the artifact so the manifest lists it",
        )
        self.path = path


class RollbackError(ArtifactError):
    """A candidate version is not newer than the one already accepted."""


class KeyFileError(ArtifactError):
    """A key file is missing, unreadable, malformed, or too open to be a private key."""

    exit_code = 2


class BlobStoreError(ArtifactError):
    """The blob store could not complete an operation (I/O, permissions, remote errors)."""


class BlobStoreUrlError(BlobStoreError):
    """A blob store URL that names no store (``--blobs s3://``): the user's input, not an artifact check."""

    exit_code = 2


class BlobNotFoundError(BlobStoreError):
    """The blob store holds no blob with this digest."""

    def __init__(self, digest: str, where: str) -> None:
        super().__init__(
            f"blob {digest} not found in {where}", hint="upload it again, or check the store URL"
        )
        self.digest = digest
