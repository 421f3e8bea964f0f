"""Who drives the fleet: one replica leads the controller, MQTT ingest and chunk serving.

PostgreSQL: a session advisory lock on a connection of its own, so the database releases it
the moment the leader's process dies. SQLite: an exclusive ``flock`` beside the database
file, which the kernel releases when the process dies. Followers retry every ``interval``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgectl.control_plane.db import StateUrl
from edgectl.logs import name_os_thread

log = logging.getLogger(__name__)


class LeaderLock(Protocol):
    """A lock at most one replica holds."""

    def try_acquire(self) -> bool:
        """Take the lock if free (or keep it); False when another replica holds it."""
        ...

    def still_held(self) -> bool:
        """False once the lock is lost (e.g. the database connection dropped)."""
        ...

    def release(self) -> None: ...


class FileLeaderLock:
    """``flock`` on ``<state file>.leader``: one controller per SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class PostgresLeaderLock:
    """``pg_try_advisory_lock`` keyed by the schema, on a dedicated connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._key: int | None = None

    def try_acquire(self) -> bool:
        import psycopg

        if self._conn is not None and self.still_held():
            return True
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            schema = self._conn.execute("SELECT current_schema()").fetchone()[0]
            db = self._conn.execute("SELECT current_database()").fetchone()[0]
            # Advisory locks are per database; the schema in the key lets test schemas lead independently.
            raw = hashlib.sha256(f"edgectl.controller/{db}/{schema}".encode()).digest()[:8]
            self._key = int.from_bytes(raw, "big", signed=True)
            got = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()[0])
        except psycopg.Error as exc:
            log.warning("leader election could not reach PostgreSQL", extra={"error": str(exc)})
            self._drop()
            return False
        if not got:
            self._drop()
        return got

    def still_held(self) -> bool:
        import psycopg

        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            self._drop()
            return False

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the leader connection failed", exc_info=True)
        self._conn = None

    def release(self) -> None:
        # Closing the session releases the advisory lock.
        self._drop()


def leader_lock_for(state_url: str) -> LeaderLock:
    parsed = StateUrl.parse(state_url)
    if parsed.dialect == "postgresql":
        return PostgresLeaderLock(parsed.target)
    return FileLeaderLock(Path(parsed.target + ".leader"))


class LeaderElection:
    """Acquires leadership in the background and runs ``on_elected``/``on_deposed`` around it."""

    def __init__(
        self,
        lock: LeaderLock,
        on_elected: Callable[[], None],
        on_deposed: Callable[[], None],
        interval: float = 1.0,
    ) -> None:
        self.lock = lock
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.interval = interval
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            if not self.leading.is_set():
                if self.lock.try_acquire():
                    log.info("this replica now leads the rollout controller")
                    self.leading.set()
                    self.on_elected()
            elif not self.lock.still_held():
                log.warning("lost leadership; stopping the controller")
                self.leading.clear()
                self.on_deposed()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.leading.is_set():
            self.leading.clear()
            self.on_deposed()
        self.lock.release()
