"""What a device proves itself with, as the control plane keeps it: secrets hashed, tokens hashed.

MQTT passwords are stored as scrypt hashes, enrollment tokens as SHA-256 (they are 192 random
bits); certificates are issued and revoked through :class:`DeviceIdentities` (the fleet CA and
the broker's user list of a secured fleet).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Protocol

# scrypt at 2**14 costs ~16 MiB and tens of ms: cheap for one enrollment, ruinous for a guesser.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_secret(secret: str) -> str:
    """scrypt of ``secret`` with a random salt, self-describing: ``scrypt$n$r$p$salt$hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` hashes to ``stored`` (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.b64decode(salt), dklen=32, n=int(n), r=int(r), p=int(p)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


@dataclass
class Credentials:
    """What Enroll hands a device once: its MQTT identity, client certificate and the keys it must
    trust (artifact keys, and the fleet keys that sign its desired state)."""

    device_id: str
    mqtt_username: str
    mqtt_password: str
    trusted_keys: list[bytes] = field(default_factory=list)
    mqtt_url: str = ""
    client_cert_pem: bytes = b""
    ca_cert_pem: bytes = b""
    fleet_keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class IssuedCertificate:
    """A device's client certificate, the CA that signed it, and its fingerprint (kept for revocation)."""

    cert_pem: bytes
    ca_pem: bytes
    sha256: str


class DeviceIdentities(Protocol):
    """Where a secured fleet's per-device identities live: the fleet CA and the broker's user list.

    Calls run inside the enrollment/decommission transaction: when one raises, nothing is stored.
    """

    def issue_certificate(self, device_id: str, csr_pem: bytes) -> IssuedCertificate | None: ...

    def provision(self, device_id: str, password: str, site: str = "") -> None: ...

    def revoke(self, device_id: str, site: str = "") -> None: ...

    def broker_url(self, site: str) -> str | None:
        """The broker a device of ``site`` connects to (its site broker), or None for the central one."""
        ...


@dataclass(frozen=True)
class EnrollmentTokenRecord:
    device_id: str
    token: str
    expires_at: float


def hash_token(token: str) -> str:
    # Tokens are 192 random bits: a fast hash suffices to keep the stored copy useless to a thief.
    return hashlib.sha256(token.encode()).hexdigest()
