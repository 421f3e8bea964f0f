"""The state store's connections: PostgreSQL transactions run concurrently on a bounded pool and
survive connections the server drops; SQLite keeps one writer, so its transactions take turns."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from edgectl.control_plane.db import Database
from edgectl.control_plane.errors import StateStoreError
from edgectl.control_plane.store import StateStore
from tests.control_plane.conftest import PG_URL


def _hold_open(db: Database, entered: threading.Event, release: threading.Event) -> threading.Thread:
    """A thread whose transaction writes a device row, then stays open until ``release``."""

    def run() -> None:
        with db.tx() as tx:
            tx.execute("INSERT INTO devices (id, created_at) VALUES (?, ?)", ("held", time.time()))
            entered.set()
            assert release.wait(20)

    thread = threading.Thread(target=run)
    thread.start()
    assert entered.wait(20)
    return thread


def test_postgresql_transactions_run_side_by_side_isolated(postgres_url: str) -> None:
    store = StateStore(postgres_url, pool_size=4)
    entered, release = threading.Event(), threading.Event()
    holder = _hold_open(store.db, entered, release)
    try:
        started = time.monotonic()
        with store.tx() as tx:  # not queued behind the open transaction
            tx.execute("INSERT INTO devices (id, created_at) VALUES (?, ?)", ("other", time.time()))
            assert tx.scalar("SELECT COUNT(*) FROM devices WHERE id = ?", ("held",)) == 0  # uncommitted
        assert time.monotonic() - started < 5
    finally:
        release.set()
        holder.join(20)
    with store.tx() as tx:
        assert sorted(r[0] for r in tx.all("SELECT id FROM devices")) == ["held", "other"]
    store.close()


def test_postgresql_pool_is_bounded_under_many_threads(postgres_url: str) -> None:
    store = StateStore(postgres_url, pool_size=3)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                with store.tx() as tx:
                    tx.execute(
                        "INSERT INTO devices (id, created_at) VALUES (?, ?)", (f"d{n}-{i}", time.time())
                    )
                    tx.scalar("SELECT pg_sleep(0.002)")
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stats = store.db._pool.get_stats()
    assert stats["pool_max"] == 3 and stats["pool_size"] <= 3
    with store.tx() as tx:
        assert tx.scalar("SELECT COUNT(*) FROM devices") == 200
    store.close()


def test_postgresql_connections_killed_by_the_server_are_replaced(postgres_url: str) -> None:
    store = StateStore(postgres_url, pool_size=2)
    pids = set()
    for _ in range(4):
        with store.tx() as tx:
            pids.add(int(tx.scalar("SELECT pg_backend_pid()")))
    bare = psycopg.connect(postgres_url, autocommit=True)  # positive control: an unpooled connection
    with psycopg.connect(PG_URL, autocommit=True) as admin:  # what a database restart does to them
        for pid in (*pids, bare.info.backend_pid):
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.2)
    with pytest.raises(psycopg.OperationalError):
        bare.execute("SELECT 1")
    bare.close()
    for _ in range(4):  # every call succeeds: a dead connection is checked and replaced as it is lent
        with store.tx() as tx:
            assert int(tx.scalar("SELECT pg_backend_pid()")) not in pids
    store.close()


def test_postgresql_unreachable_is_a_clear_error() -> None:
    with pytest.raises(StateStoreError, match="cannot connect to PostgreSQL"):
        Database("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", pool_size=1)
    with pytest.raises(StateStoreError, match="at least one"):
        Database(PG_URL, pool_size=0)


@pytest.mark.parametrize("url", ["mysql://cp@db/edgectl", "sqlite:///"])
def test_migrate_with_a_state_url_naming_no_store_is_bad_input(url: str) -> None:
    # Exit 2 (fix your input), as docs/cli.md promises; it was 1, "any other failure".
    cmd = [sys.executable, "-m", "edgectl", "control-plane", "migrate", "--state", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "state URL" in result.stderr and "Traceback" not in result.stderr


def test_sqlite_transactions_take_turns(tmp_path: Path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    entered, release = threading.Event(), threading.Event()
    holder = _hold_open(store.db, entered, release)
    done = threading.Event()

    def second() -> None:
        with store.tx() as tx:
            tx.execute("INSERT INTO devices (id, created_at) VALUES (?, ?)", ("other", time.time()))
        done.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    assert not done.wait(0.5), "a second SQLite transaction ran while the first was open"
    release.set()
    holder.join(20)
    assert done.wait(20)
    waiter.join(20)
    store.close()
