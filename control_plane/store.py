"""The state store: the database, migrated on open, plus the JSON helpers every repository shares.

Each aggregate keeps its SQL next to its domain code (``artifacts``, ``fleet``,
``rollout_store``, ``audit``); they all run inside ``StateStore.tx()``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgectl.control_plane.db import DEFAULT_POOL_SIZE, Database, Dialect, Tx
from edgectl.control_plane.migrations import migrate, schema_version

log = logging.getLogger(__name__)


class StateStore:
    """The control plane's durable state: SQLite by default, PostgreSQL (pooled) for replicas."""

    def __init__(self, url: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.url = url
        self.db = Database(url, pool_size)
        applied = migrate(self.db)
        self.applied_now = applied  # the versions this open applied (for `control-plane migrate`)
        if applied:
            log.info("state store migrated", extra={"versions": applied, "dialect": self.db.dialect})

    @property
    def dialect(self) -> Dialect:
        return self.db.dialect

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """A transaction over the whole store."""
        with self.db.tx() as tx:
            yield tx

    def schema_version(self) -> int:
        return schema_version(self.db)

    def close(self) -> None:
        self.db.close()


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON for a TEXT column."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None, default: Any = None) -> Any:
    """The inverse of :func:`dumps`; empty or NULL gives ``default``."""
    if not text:
        return default
    return json.loads(text)
