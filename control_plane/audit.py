"""The audit log: who called which mutating method, on what, from where, and how it ended."""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgectl.control_plane.store import StateStore

ANONYMOUS = "anonymous"  # until the security issue adds per-caller tokens
SECRET_FIELDS = frozenset({"token", "password", "mqtt_password", "data", "manifest", "signatures", "csr_pem"})


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
        with self.store.tx() as tx:
            tx.execute(
                "INSERT INTO audit_log (at, identity, peer, action, target, details, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), identity, peer, action, target, details, outcome),
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
