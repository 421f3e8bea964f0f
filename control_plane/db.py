"""SQLite (embedded, WAL, one writer) or PostgreSQL (psycopg 3, a connection pool), behind one API.

SQL is written once with ``?`` placeholders; the PostgreSQL dialect rewrites them to ``%s``.
Statements therefore never contain a literal ``?`` or ``%``. On SQLite a transaction holds the
one connection's lock, so transactions run one at a time (SQLite has a single writer anyway).
On PostgreSQL each transaction borrows a pooled connection, so API calls, the MQTT ingest and
the controller run concurrently, isolated as they already are across replicas.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from edgectl.control_plane.errors import StateStoreError, StateUrlError

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
                raise StateUrlError(
                    f"state URL {url!r} names no file",
                    hint="use sqlite:///edgectl.db or sqlite:////abs/path.db",
                )
            return cls("sqlite", path)
        if "://" in url:
            raise StateUrlError(
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


DEFAULT_POOL_SIZE = 16  # PostgreSQL connections per replica; 3 replicas fit max_connections=100


class Database:
    """Transactions over SQLite's one serialized connection or a PostgreSQL connection pool."""

    def __init__(self, url: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.url = StateUrl.parse(url)
        self.dialect: Dialect = self.url.dialect
        if pool_size < 1:
            raise StateStoreError(f"the PostgreSQL pool needs at least one connection, not {pool_size}")
        self.pool_size = pool_size
        self._lock = threading.RLock()
        self._conn: Any = None  # SQLite
        self._pool: Any = None  # PostgreSQL
        if self.dialect == "sqlite":
            self._open_sqlite()
        else:
            self._open_pool()

    def _open_sqlite(self) -> None:
        path = Path(self.url.target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Made 0600 before SQLite opens it: its -wal and -shm files copy the database's mode.
            if str(path) != ":memory:":
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode (fsync at checkpoints).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StateStoreError(f"cannot open SQLite state {path}: {exc}") from exc
        self._conn = conn

    def _open_pool(self) -> None:
        try:  # imported here: only PostgreSQL deployments need them
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StateStoreError(
                "PostgreSQL state needs psycopg and psycopg-pool", hint="pip install 'edgectl[postgres]'"
            ) from exc
        try:  # one direct connection first: a wrong URL or a down server fails now, with libpq's reason
            psycopg.connect(self.url.target, connect_timeout=10).close()
        except psycopg.Error as exc:
            raise StateStoreError(
                f"cannot connect to PostgreSQL state: {exc}".strip(),
                hint="check the state URL, that PostgreSQL runs and accepts this user",
            ) from exc
        pool = ConnectionPool(
            self.url.target,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "connect_timeout": 10},
            # A connection is checked as it is lent, so one lost with a database restart is replaced
            # instead of failing the call that borrowed it.
            check=ConnectionPool.check_connection,
            timeout=10,  # waiting for a free connection fails like an unreachable database did
            name="edgectl-state",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=15)
        except (PoolTimeout, psycopg.Error) as exc:
            pool.close()
            raise StateStoreError(
                f"cannot connect to PostgreSQL state: {exc}".strip(),
                hint="check the state URL, that PostgreSQL runs and accepts this user",
            ) from exc
        self._pool = pool

    @contextlib.contextmanager
    def tx(self) -> Iterator[Tx]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        if self.dialect == "postgresql":
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield Tx(cur, self.dialect)
            return
        with self._lock:
            cur = self._conn.cursor()
            # IMMEDIATE takes the write lock up front, so two processes never deadlock on upgrade.
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(cur, self.dialect)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._pool is not None:
                self._pool.close()
                self._pool = None
