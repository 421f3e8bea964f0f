"""Schema migrations, applied in order on start; one list serves SQLite and PostgreSQL.

A migration is never edited once released: a schema change is a new entry. Replicas that
start together serialize on a lock, so each migration runs exactly once.
"""

from __future__ import annotations

import time

from edgectl.control_plane.db import Database, Tx

# {blob}, {float} and {serial} are filled per dialect.
_TYPES = {
    "sqlite": {"blob": "BLOB", "float": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"blob": "BYTEA", "float": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY"},
}

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "inventory, artifacts, rollouts, audit",
        [
            """CREATE TABLE artifacts (
                digest TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                manifest {blob} NOT NULL,
                signatures {blob} NOT NULL,
                total_size BIGINT NOT NULL,
                uploaded_at {float} NOT NULL,
                uploaded_by TEXT NOT NULL,
                key_ids TEXT NOT NULL,
                pinned INTEGER NOT NULL DEFAULT 0,
                UNIQUE (name, version))""",
            """CREATE TABLE upload_plans (
                digest TEXT PRIMARY KEY,
                manifest {blob} NOT NULL,
                signatures {blob} NOT NULL,
                created_at {float} NOT NULL)""",
            """CREATE TABLE devices (
                id TEXT PRIMARY KEY,
                labels TEXT NOT NULL DEFAULT '{{}}',
                reported_labels TEXT NOT NULL DEFAULT '{{}}',
                created_at {float} NOT NULL,
                enrolled_at {float},
                mqtt_username TEXT,
                password_hash TEXT,
                online INTEGER NOT NULL DEFAULT 0,
                last_seen {float},
                agent_version TEXT NOT NULL DEFAULT '',
                profile TEXT NOT NULL DEFAULT '',
                health INTEGER NOT NULL DEFAULT 0,
                last_error TEXT NOT NULL DEFAULT '',
                observed_generation BIGINT NOT NULL DEFAULT 0,
                models TEXT NOT NULL DEFAULT '{{}}',
                stats TEXT NOT NULL DEFAULT '{{}}',
                generation BIGINT NOT NULL DEFAULT 0,
                desired TEXT NOT NULL DEFAULT '')""",
            # Decommissioned ids, so a stale retained report cannot bring a device back unasked.
            """CREATE TABLE tombstones (id TEXT PRIMARY KEY, at {float} NOT NULL)""",
            """CREATE TABLE enrollment_tokens (
                token_hash TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                labels TEXT NOT NULL,
                created_at {float} NOT NULL,
                expires_at {float} NOT NULL,
                used_at {float})""",
            """CREATE TABLE rollouts (
                id TEXT PRIMARY KEY,
                artifact_digest TEXT NOT NULL,
                artifact_name TEXT NOT NULL,
                artifact_version BIGINT NOT NULL,
                selector TEXT NOT NULL,
                strategy TEXT NOT NULL,
                state INTEGER NOT NULL,
                current_wave INTEGER NOT NULL DEFAULT 0,
                failures INTEGER NOT NULL DEFAULT 0,
                reason TEXT NOT NULL DEFAULT '',
                stop_state INTEGER NOT NULL DEFAULT 0,
                stop_deadline {float},
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL,
                created_by TEXT NOT NULL)""",
            """CREATE TABLE rollout_waves (
                rollout_id TEXT NOT NULL REFERENCES rollouts(id),
                idx INTEGER NOT NULL,
                state INTEGER NOT NULL,
                size INTEGER NOT NULL,
                started_at {float},
                finished_at {float},
                PRIMARY KEY (rollout_id, idx))""",
            """CREATE TABLE rollout_devices (
                rollout_id TEXT NOT NULL REFERENCES rollouts(id),
                device_id TEXT NOT NULL,
                wave INTEGER NOT NULL,
                state INTEGER NOT NULL,
                previous_digest TEXT NOT NULL DEFAULT '',
                previous_version BIGINT NOT NULL DEFAULT 0,
                reason TEXT NOT NULL DEFAULT '',
                updated_at {float} NOT NULL,
                deadline {float},
                healthy_since {float},
                generation BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (rollout_id, device_id))""",
            "CREATE INDEX rollout_devices_device ON rollout_devices (device_id)",
            """CREATE TABLE rollout_events (
                seq {serial},
                rollout_id TEXT NOT NULL,
                at {float} NOT NULL,
                kind TEXT NOT NULL,
                wave INTEGER NOT NULL DEFAULT -1,
                device_id TEXT NOT NULL DEFAULT '',
                message TEXT NOT NULL DEFAULT '')""",
            "CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, seq)",
            """CREATE TABLE audit_log (
                id {serial},
                at {float} NOT NULL,
                identity TEXT NOT NULL,
                peer TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                details TEXT NOT NULL,
                outcome TEXT NOT NULL)""",
            "CREATE INDEX audit_log_at ON audit_log (at)",
        ],
    ),
    (
        2,
        "device client certificates, for mTLS revocation",
        ["ALTER TABLE devices ADD COLUMN cert_sha256 TEXT NOT NULL DEFAULT ''"],
    ),
    (
        3,
        "revoked bearer tokens",
        [
            """CREATE TABLE revoked_tokens (
                token_id TEXT PRIMARY KEY,
                subject TEXT NOT NULL,
                expires_at {float} NOT NULL,
                revoked_at {float} NOT NULL,
                revoked_by TEXT NOT NULL,
                reason TEXT NOT NULL)""",
        ],
    ),
    (
        4,
        "signed desired states: per-device order counters that outlive the device, the store's epoch",
        [
            "CREATE TABLE order_counters (device_id TEXT PRIMARY KEY, counter BIGINT NOT NULL)",
            "INSERT INTO order_counters (device_id, counter) SELECT id, generation FROM devices",
            "CREATE TABLE fleet_epoch (id INTEGER PRIMARY KEY, epoch BIGINT NOT NULL)",
            "ALTER TABLE devices ADD COLUMN order_expires_at {float}",
            "ALTER TABLE devices ADD COLUMN order_key_id TEXT NOT NULL DEFAULT ''",
        ],
    ),
]

# Replicas that start together take this lock (PostgreSQL) before migrating.
_PG_MIGRATION_LOCK = 0x6564676563746C01


def migrate(db: Database) -> list[int]:
    """Apply every migration the database lacks; returns the versions applied now."""
    types = _TYPES[db.dialect]
    applied_now: list[int] = []
    with db.tx() as tx:
        if db.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_PG_MIGRATION_LOCK,))
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            f"description TEXT NOT NULL, applied_at {types['float']} NOT NULL)"
        )
        done = {int(r[0]) for r in tx.all("SELECT version FROM schema_migrations")}
        for version, description, statements in MIGRATIONS:
            if version in done:
                continue
            _apply(tx, statements, types)
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (version, description, time.time()),
            )
            applied_now.append(version)
    return applied_now


def _apply(tx: Tx, statements: list[str], types: dict[str, str]) -> None:
    for statement in statements:
        tx.execute(statement.format(**types))


def schema_version(db: Database) -> int:
    """The newest migration applied (0 for an empty database)."""
    with db.tx() as tx:
        return int(tx.scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") or 0)
