"""Writing secrets and the files around them: whole or not at all (see :mod:`edgectl.durable`)."""

from __future__ import annotations

from pathlib import Path

from edgectl.durable import atomic_write


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` readable by its owner only (0600 from the first byte)."""
    atomic_write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Atomically write a non-secret file (certificates, configs)."""
    atomic_write(path, data, 0o644)
