"""The audit log: who called which mutating method, on what, from where, and how it ended."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from edgectl.control_plane.store import StateStore

ANONYMOUS = "anonymous"  # until the security issue adds per-caller tokens
SECRET_FIELDS = frozenset({"token", "password", "mqtt_password", "data", "manifest", "signatures", "csr_pem"})
# Bounds on one row: a caller (even an anonymous Enroll) must not be able to fill the disk.
MAX_FIELD_CHARS = 256
MAX_DETAILS_CHARS = 4096


def _bounded(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 32]}...[{len(text)} chars, truncated]"


def _bounded_details(details: str) -> str:
    """Details stay JSON: an oversized one becomes {"truncated": N, "head": "..."}."""
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return json.dumps({"truncated": len(details), "head": details[: MAX_DETAILS_CHARS // 2]})


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: float
    identity: str
    peer: str
    action: str
    target: str
    details: str
    outcome: str


class AuditLog:
    """Append-only entries in the state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def record(self, identity: str, peer: str, action: str, target: str, details: str, outcome: str) -> None:
        """Append one entry; every field is bounded, so no caller can make a row large."""
        row = (time.time(), *map(_bounded, (identity, peer, action, target)), _bounded_details(details),
               _bounded(outcome))  # fmt: skip
        with self.store.tx() as tx:
            tx.execute(
                "INSERT INTO audit_log (at, identity, peer, action, target, details, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def entries(
        self,
        since: float | None = None,
        until: float | None = None,
        action: str = "",
        offset: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Newest first."""
        sql = "SELECT id, at, identity, peer, action, target, details, outcome FROM audit_log WHERE 1 = 1"
        params: list[object] = []
        if since is not None:
            sql += " AND at >= ?"
            params.append(since)
        if until is not None:
            sql += " AND at <= ?"
            params.append(until)
        if action:
            sql += " AND action = ?"
            params.append(action)
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self.store.tx() as tx:
            rows = tx.all(sql, params)
        return [AuditRecord(int(r[0]), float(r[1]), *r[2:]) for r in rows]
