"""Build build/typecheck/edgectl: a symlink tree in which mypy sees the installed import names.

The brief's folders (agent/, compress/, ...) import as edgectl.agent, edgectl.compress, ...
through setup.py's package_dir; mypy reads files, not the install, so it gets the same
picture from links. Rebuilt on every `make lint`, so new modules need no re-install.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAPPED = {"agent": "agent", "compress": "compress", "control_plane": "control_plane", "devices": "devices",
          "protos": "protos"}  # fmt: skip


def main() -> None:
    root = REPO / "build" / "typecheck"
    shutil.rmtree(root, ignore_errors=True)
    package = root / "edgectl"
    package.mkdir(parents=True)
    for entry in (REPO / "edgectl").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (package / name).symlink_to(REPO / folder)
    print(root)


if __name__ == "__main__":
    main()
