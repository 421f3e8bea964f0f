"""Bearer tokens for people and CI: Ed25519-signed claims with a role and an expiry.

A token is ``edgectl.<claims>.<signature>`` (base64url), stateless so that every control-plane
replica verifies it with the public key alone. Roles are ordered: a deployer may do what a
viewer may, an admin what a deployer may.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgectl.security.errors import TokenError
from edgectl.security.files import check_private, write_private

PREFIX = "edgectl"
CLOCK_SKEW_S = 60
# No token lives longer: a revocation named by id alone (its expiry unknown) is kept this long,
# so it outlives every token that id could belong to.
MAX_TOKEN_TTL_S = 366 * 24 * 3600
TOKEN_ID_BYTES = 8  # a token's id (its "jti" claim): this many random bytes, in hex
_TOKEN_ID = re.compile(rf"^[0-9a-f]{{{2 * TOKEN_ID_BYTES}}}$")


def is_token_id(text: str) -> bool:
    """True when ``text`` has the form of the ids ``TokenIssuer`` gives its tokens."""
    return bool(_TOKEN_ID.match(text))


class Role(enum.IntEnum):
    """What an identity may do; higher includes lower."""

    DEVICE = 0  # an agent: fetch artifacts only
    VIEWER = 1
    DEPLOYER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(r.name.lower() for r in cls)
            raise TokenError(f"unknown role {text!r}", hint=f"use one of {names}") from None


@dataclass(frozen=True)
class Claims:
    """Who a token speaks for, with which role, until when."""

    subject: str
    role: Role
    issued_at: int
    expires_at: int
    token_id: str
    key_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class TokenIssuer:
    """Signs tokens with the control plane's token key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.key_id = key_id_of(key.public_key())

    @classmethod
    def load_or_create(cls, path: Path, *, group_readable: bool = False) -> TokenIssuer:
        """The key at ``path`` (PEM, 0600), made on first use."""
        if path.exists():
            check_private(path, "token key", group_readable=group_readable)
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise TokenError(f"{path} is not an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(path, pem)
        return cls(key)

    def issue(
        self, subject: str, role: Role, ttl_s: int = 3600 * 24 * 30, *, now: float | None = None
    ) -> str:
        """A token for ``subject`` with ``role``, valid ``ttl_s`` seconds from ``now`` (default: now)."""
        if ttl_s <= 0:
            raise TokenError("a token's lifetime must be positive")
        if ttl_s > MAX_TOKEN_TTL_S:
            raise TokenError(
                f"a token may live at most {MAX_TOKEN_TTL_S // 86400} days (asked for {ttl_s // 86400})",
                hint=f"mint a shorter one (--ttl {MAX_TOKEN_TTL_S // 3600}h at most) and renew it before it expires",
            )
        now = int(time.time() if now is None else now)
        claims = {"sub": subject, "role": role.name.lower(), "iat": now, "exp": now + ttl_s,
                  "jti": secrets.token_hex(TOKEN_ID_BYTES), "kid": self.key_id}  # fmt: skip
        body = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
        signature = self.key.sign(f"{PREFIX}.{body}".encode())
        return f"{PREFIX}.{body}.{_b64(signature)}"

    def verifier(self) -> TokenVerifier:
        return TokenVerifier([self.key.public_key()])


class TokenVerifier:
    """Checks a token's signature against trusted keys, then its expiry and role."""

    def __init__(self, public_keys: list[Ed25519PublicKey]) -> None:
        self._keys = {key_id_of(k): k for k in public_keys}

    def verify(self, token: str, now: float | None = None) -> Claims:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise TokenError("malformed token", hint="expected edgectl.<claims>.<signature>")
        try:
            raw_claims = _unb64(parts[1])
            signature = _unb64(parts[2])
            claims = json.loads(raw_claims)
            kid = str(claims["kid"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise TokenError("malformed token claims") from None
        key = self._keys.get(kid)
        if key is None:
            raise TokenError("token signed by an unknown key", hint="ask an admin for a new token")
        try:
            key.verify(signature, f"{PREFIX}.{parts[1]}".encode())
        except InvalidSignature:
            raise TokenError("token signature does not verify (forged or altered)") from None
        now = time.time() if now is None else now
        try:
            expires_at, issued_at = int(claims["exp"]), int(claims["iat"])
            result = Claims(str(claims["sub"]), Role.parse(str(claims["role"])), issued_at, expires_at,
                            str(claims["jti"]), kid)  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise TokenError("malformed token claims") from None
        if expires_at - issued_at > MAX_TOKEN_TTL_S:
            raise TokenError(
                f"token for {result.subject} claims a lifetime over {MAX_TOKEN_TTL_S // 86400} days",
                hint="ask an admin for a new token",
            )
        if now > expires_at + CLOCK_SKEW_S:
            raise TokenError(f"token for {result.subject} expired", hint="ask an admin for a new token")
        if issued_at > now + CLOCK_SKEW_S:
            raise TokenError("token issued in the future: check this machine's clock")
        return result
