"""Maps the brief's top-level folders into the one import package ``edgectl``.

pyproject.toml holds the metadata; this file only computes ``packages`` and
``package_dir`` by walking the folders, so a new sub-package needs no edit here.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
FOLDERS = {
    "edgectl": "edgectl",
    "edgectl.agent": "agent",
    "edgectl.artifact": "artifact",
    "edgectl.compress": "compress",
    "edgectl.control_plane": "control_plane",
    "edgectl.devices": "devices",
    "edgectl.mqtt": "mqtt",
    "edgectl.protos": "protos",
}


def _walk(import_root: str, folder: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for init in sorted((ROOT / folder).rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT / folder)
        name = ".".join([import_root, *rel.parts])
        found[name] = str(init.parent.relative_to(ROOT))
    return found


package_dir: dict[str, str] = {}
for import_name, folder_name in FOLDERS.items():
    package_dir.update(_walk(import_name, folder_name))

setup(packages=sorted(package_dir), package_dir=package_dir)
