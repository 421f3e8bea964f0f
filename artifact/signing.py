"""Ed25519 signing of canonical manifest bytes, key ids, and the trust store of public keys.

Signatures live beside the manifest in ``manifest.sig.json`` (never inside it), so adding a
second signature while rotating keys does not change the artifact's digest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgectl.artifact.canonical import canonical_bytes, parse_json, sha256_digest
from edgectl.artifact.errors import KeyFileError, ManifestError, SignatureError, UntrustedKeyError
from edgectl.security.files import check_private

ALG = "ed25519"
SIG_FORMAT = "edgectl.sig/v1"


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of sha256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, readable by openssl and by ``TrustStore.from_path``."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        # Created 0600 from the first byte: never a moment where another user could read it.
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"{path} already exists", hint="pass --force to overwrite it, or choose --out"
        ) from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key that signs manifests."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, data: bytes) -> Signature:
        """Sign ``data`` (canonical manifest bytes); Ed25519 is deterministic, so same key+data, same sig."""
        return Signature(key_id=self.key_id, alg=ALG, sig=self.private_key.sign(data))

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def save(self, path: Path, *, overwrite: bool = False) -> Path:
        """Write the private key (mode 0600) to ``path`` and the public key beside it; return the latter."""
        _write_private(path, self.private_pem(), overwrite=overwrite)
        pub = public_key_path(path)
        pub.write_bytes(public_pem(self.public_key))
        return pub

    @classmethod
    def load(cls, path: Path, *, group_readable: bool = False) -> SigningKey:
        """Read a PKCS#8 PEM Ed25519 private key, refusing files others can read (as ssh does).

        ``group_readable`` lets a service read its key from a Kubernetes Secret volume, which
        mounts files root:fsGroup with mode 0440; anyone else's access is still refused."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from exc
        check_private(path, "signing key", group_readable=group_readable, error=KeyFileError)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}; edgectl signs with Ed25519 keys only")
        return cls(key)


def public_key_path(private_path: Path) -> Path:
    """Where the public half of ``private_path`` lives: ``NAME.pub.pem`` beside ``NAME[.pem]``."""
    stem = private_path.name.removesuffix(".pem")
    return private_path.with_name(stem + ".pub.pem")


@dataclass(frozen=True)
class Signature:
    """One signature over the canonical manifest bytes."""

    key_id: str
    alg: str
    sig: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "alg": self.alg, "sig": base64.b64encode(self.sig).decode("ascii")}


def load_public_key(data: bytes, source: str) -> Ed25519PublicKey:
    """Parse a PEM public key (or the public half of a PEM private key) as Ed25519."""
    try:
        if b"PRIVATE KEY" in data:
            key: object = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{source} is not a PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} holds a {type(key).__name__}; edgectl trusts Ed25519 keys only")
    return key


class TrustStore:
    """The public keys whose signatures this process accepts; several at once for key rotation."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for k in keys:
            self.add(k)

    def add(self, public_key: Ed25519PublicKey) -> str:
        """Trust ``public_key``; returns its key id."""
        kid = key_id(public_key)
        self._keys[kid] = public_key
        return kid

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    def remove(self, kid: str) -> None:
        """Stop trusting key ``kid`` (a retired key after a rotation); unknown ids are ignored."""
        self._keys.pop(kid, None)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def key_ids(self) -> list[str]:
        """Sorted ids of every trusted key."""
        return sorted(self._keys)

    @classmethod
    def from_path(cls, path: Path) -> TrustStore:
        """Load one PEM file, or every ``*.pem``/``*.pub`` public key in a directory (private keys skipped)."""
        store = cls()
        store.add_path(path)
        return store

    def add_path(self, path: Path) -> list[str]:
        """Trust the key(s) at ``path`` (file or directory); returns the ids added."""
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".pub") and p.is_file())
            added = []
            for f in files:
                data = f.read_bytes()
                if b"PRIVATE KEY" in data:
                    continue  # a trust dir may sit beside a signing key; trust only what is meant to be public
                added.append(self.add(load_public_key(data, str(f))))
            if not added:
                raise KeyFileError(f"no public keys (*.pem, *.pub) found in {path}")
            return added
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read trusted key {path}: {exc.strerror}") from exc
        return [self.add(load_public_key(data, str(path)))]


def encode_signatures(manifest_bytes: bytes, signatures: Iterable[Signature]) -> bytes:
    """The canonical bytes of ``manifest.sig.json`` for these signatures."""
    sigs = sorted((s.to_dict() for s in signatures), key=lambda d: d["key_id"])
    doc = {"format": SIG_FORMAT, "manifest_digest": sha256_digest(manifest_bytes), "signatures": sigs}
    return canonical_bytes(doc)


def decode_signatures(data: bytes) -> tuple[str, list[Signature]]:
    """Parse ``manifest.sig.json`` into (manifest digest it claims, signatures)."""
    try:
        doc = parse_json(data, what="manifest.sig.json")
    except ManifestError as exc:
        raise SignatureError(str(exc), hint="the signature file is damaged; fetch the bundle again") from exc
    if (
        not isinstance(doc, dict)
        or doc.get("format") != SIG_FORMAT
        or not isinstance(doc.get("signatures"), list)
    ):
        raise SignatureError(f"manifest.sig.json is not an {SIG_FORMAT} document")
    sigs: list[Signature] = []
    for item in doc["signatures"]:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("key_id", "alg", "sig")
        ):
            raise SignatureError("manifest.sig.json: each signature needs string key_id, alg and sig")
        try:
            raw = base64.b64decode(item["sig"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError(f"manifest.sig.json: signature by {item['key_id']} is not base64") from exc
        sigs.append(Signature(item["key_id"], item["alg"], raw))
    digest = doc.get("manifest_digest")
    return (digest if isinstance(digest, str) else ""), sigs


def verify_signatures(manifest_bytes: bytes, signature_bytes: bytes, trust: TrustStore) -> list[str]:
    """Check that a trusted key signed exactly ``manifest_bytes``; returns the trusted signer ids.

    A signature by an unknown key is ignored (it may be a newer key during rotation), but a
    signature by a trusted key that does not verify is an attack or damage and fails the bundle.
    """
    claimed, sigs = decode_signatures(signature_bytes)
    if not sigs:
        raise SignatureError(
            "manifest.sig.json holds no signatures", hint="sign the artifact before publishing"
        )
    actual = sha256_digest(manifest_bytes)
    if claimed != actual:
        raise SignatureError(
            f"manifest.sig.json is for manifest {claimed or '?'}, but manifest.json is {actual}",
            hint="manifest.json was changed after signing, or the signature belongs to another artifact",
        )
    good: list[str] = []
    for s in sigs:
        pub = trust.get(s.key_id)
        if pub is None:
            continue
        if s.alg != ALG:
            raise SignatureError(f"signature by {s.key_id} uses {s.alg!r}; only {ALG} is accepted")
        try:
            pub.verify(s.sig, manifest_bytes)
        except InvalidSignature as exc:
            raise SignatureError(
                f"manifest.sig.json: signature by trusted key {s.key_id} does not verify over manifest.json",
                hint="the manifest or its signature was tampered with; do not use this bundle",
            ) from exc
        good.append(s.key_id)
    if not good:
        raise UntrustedKeyError([s.key_id for s in sigs], trust.key_ids())
    return good
