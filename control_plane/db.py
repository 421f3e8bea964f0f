"""One SQL connection to SQLite (embedded, WAL) or PostgreSQL (psycopg 3), behind the same API.

SQL is written once with ``?`` placeholders; the PostgreSQL dialect rewrites them to ``%s``.
Statements therefore never contain a literal ``?`` or ``%``. A transaction holds the
connection's lock, so the gRPC threads, the MQTT ingest and the controller never interleave.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from edgectl.control_plane.errors import StateStoreError

Dialect = Literal["sqlite", "postgresql"]
Row = tuple[Any, ...]


@dataclass(frozen=True)
class StateUrl:
    """A parsed ``--state`` URL: ``sqlite:///rel.db``, ``sqlite:////abs.db`` or ``postgresql://...``."""

    dialect: Dialect
    target: str  # a file path for SQLite, the libpq URL for PostgreSQL

    @classmethod
    def parse(cls, url: str) -> StateUrl:
        if url.startswith(("postgresql://", "postgres://")):
            return cls("postgresql", url)
        if url.startswith("sqlite://"):
            parsed = urlparse(url)
            path = unquote(parsed.path)
            # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db" (SQLAlchemy's convention)
            path = path[1:] if path.startswith("/") else path
            if not path:
                raise StateStoreError(
                    f"state URL {url!r} names no file",
                    hint="use sqlite:///edgectl.db or sqlite:////abs/path.db",
                )
            return cls("sqlite", path)
        if "://" in url:
            raise StateStoreError(
                f"unsupported state URL {url!r}", hint="use sqlite:///FILE or postgresql://USER@HOST/DB"
            )
        return cls("sqlite", url)  # a bare path


class Tx:
    """An open transaction: run statements and read rows."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cur = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        self._cur.execute(self._sql(sql), tuple(params))
        return int(self._cur.rowcount or 0)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cur.executemany(self._sql(sql), [tuple(r) for r in rows])

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cur.execute(self._sql(sql), tuple(params))
        return [tuple(r) for r in self._cur.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._cur.execute(self._sql(sql), tuple(params))
        row = self._cur.fetchone()
        return tuple(row) if row is not None else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return row[0] if row is not None else None


class Database:
    """A serialized connection with transactions; reconnects to PostgreSQL after a lost connection."""

    def __init__(self, url: str) -> None:
        self.url = StateUrl.parse(url)
        self.dialect: Dialect = self.url.dialect
        self._lock = threading.RLock()
        self._conn: Any = None
        self._connect()

    def _connect(self) -> None:
        if self.dialect == "sqlite":
            path = Path(self.url.target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL is durable across process crashes in WAL mode (fsync at checkpoints).
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise StateStoreError(f"cannot open SQLite state {path}: {exc}") from exc
            self._conn = conn
            return
        try:
            import psycopg  # imported here: only PostgreSQL deployments need it
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StateStoreError(
                "PostgreSQL state needs psycopg", hint="pip install 'edgectl[postgres]'"
            ) from exc
        try:
            self._conn = psycopg.connect(self.url.target, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StateStoreError(f"cannot connect to PostgreSQL state: {exc}".strip()) from exc

    @contextlib.contextmanager
    def tx(self) -> Iterator[Tx]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        with self._lock:
            if self.dialect == "sqlite":
                cur = self._conn.cursor()
                # IMMEDIATE takes the write lock up front, so two processes never deadlock on upgrade.
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(cur, self.dialect)
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
                return
            self._ensure_pg()
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield Tx(cur, self.dialect)

    def _ensure_pg(self) -> None:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
