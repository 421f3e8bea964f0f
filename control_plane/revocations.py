"""Revoked bearer tokens, kept in the state store so that every replica refuses them at once.

Tokens stay stateless to verify (a signature and an expiry); revocation adds one indexed lookup
by the token's id (its ``jti`` claim) per authenticated call. Once its token could no longer be
accepted anyway (expired, past the clock-skew allowance), the next revocation sweeps a row away,
so the table holds only tokens that could still be presented.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgectl.control_plane.errors import InvalidArgument
from edgectl.control_plane.store import StateStore
from edgectl.security.errors import TokenError
from edgectl.security.tokens import CLOCK_SKEW_S, MAX_TOKEN_TTL_S, TOKEN_ID_BYTES, TokenVerifier, is_token_id

# A revocation named by id alone does not know its token's expiry: keep it until any token with
# that id (issued up to now, plus the clock-skew allowance) must have expired.
_UNKNOWN_EXPIRY_S = MAX_TOKEN_TTL_S + CLOCK_SKEW_S


@dataclass(frozen=True)
class Revocation:
    """What RevokeToken did: the token's id, whose it was (when known), and whether it is new."""

    token_id: str
    subject: str
    newly_revoked: bool


class TokenRevocations:
    """Revoke tokens by id; ask whether one is revoked."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def revoke(
        self,
        verifier: TokenVerifier | None,
        *,
        token: str = "",
        token_id: str = "",
        by: str,
        reason: str = "",
        now: float | None = None,
    ) -> Revocation:
        """Revoke ``token`` (checked with ``verifier``) or, when only that is known, ``token_id``."""
        now = time.time() if now is None else now
        if bool(token) == bool(token_id):
            raise InvalidArgument("RevokeToken needs exactly one of token and token_id")
        subject, expires_at = "", now + _UNKNOWN_EXPIRY_S
        if token:
            if verifier is None:
                raise InvalidArgument("this control plane runs without tokens (no --security-dir)")
            try:
                claims = verifier.verify(token.strip(), now=now)
            except TokenError as exc:
                raise InvalidArgument(f"cannot revoke that token: {exc}") from exc
            token_id, subject, expires_at = claims.token_id, claims.subject, float(claims.expires_at)
        elif not is_token_id(token_id):
            raise InvalidArgument(
                f"token id {token_id!r} is not {2 * TOKEN_ID_BYTES} hex digits (the 'id' that `edgectl control-plane token` prints)"
            )
        with self.store.tx() as tx:
            tx.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now - CLOCK_SKEW_S,))
            added = tx.execute(
                "INSERT INTO revoked_tokens (token_id, subject, expires_at, revoked_at, revoked_by, reason) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (token_id) DO NOTHING",
                (token_id, subject, expires_at, now, by, reason),
            )
        return Revocation(token_id, subject, added > 0)

    def revoked(self, token_id: str) -> bool:
        with self.store.tx() as tx:
            return tx.one("SELECT 1 FROM revoked_tokens WHERE token_id = ?", (token_id,)) is not None
