"""Writing secrets and the files around them: whole or not at all (see :mod:`edgectl.durable`).

Secrets are written 0600 and refused on load when others may read them (as ssh does), with the
``chmod`` that fixes it; processes that keep state (control plane, agent, ``edgectl up``) run
under :data:`PRIVATE_UMASK`, so what they create (SQLite and its WAL, blobs, logs) is theirs alone.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from edgectl.durable import atomic_write
from edgectl.security.errors import SecurityError

PRIVATE_UMASK = 0o077


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Run the block under :data:`PRIVATE_UMASK` (files 0600, directories 0700), then restore."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def check_private(path: Path, what: str = "key file", *, group_readable: bool = False) -> None:
    """Raise when ``path`` grants any access to group or others (a secret must be its owner's only).

    ``group_readable``: a service reading its secrets from a Kubernetes Secret volume, which
    mounts files root:fsGroup 0440; group read is then allowed, anything more is still refused.
    """
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (0o037 if group_readable else 0o077):
        raise SecurityError(
            f"{what} {path} is readable by other users (mode {mode:o})", hint=f"run: chmod 600 {path}"
        )


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` readable by its owner only (0600 from the first byte)."""
    atomic_write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Atomically write a non-secret file (certificates, configs)."""
    atomic_write(path, data, 0o644)
