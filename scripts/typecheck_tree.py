"""Build build/typecheck/edgectl: a symlink tree in which mypy sees the installed import names.

The brief's folders (agent/, compress/, ...) import as edgectl.agent, edgectl.compress, ...
through setup.py's package_dir; mypy reads files, not the install, so it gets the same
picture from links. Brought up to date on every `make lint`, so new modules need no re-install.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAPPED = {
    "agent": "agent",
    "artifact": "artifact",
    "compress": "compress",
    "control_plane": "control_plane",
    "devices": "devices",
    "mqtt": "mqtt",
    "protos": "protos",
}


def _link(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target``, leaving a correct link alone (several runs may race)."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def main() -> None:
    root = REPO / "build" / "typecheck"
    package = root / "edgectl"
    package.mkdir(parents=True, exist_ok=True)
    wanted = {e.name: e for e in (REPO / "edgectl").iterdir() if e.name != "__pycache__"}
    wanted.update({name: REPO / folder for name, folder in MAPPED.items()})
    for entry in package.iterdir():
        if entry.name not in wanted:
            entry.unlink() if entry.is_symlink() else shutil.rmtree(entry)
    for name, target in wanted.items():
        _link(package / name, target)
    print(root)


if __name__ == "__main__":
    main()
