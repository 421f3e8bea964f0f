"""Path safety: a bundle path is a plain relative POSIX path that cannot leave the bundle."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgectl.artifact.errors import PathEscapeError

_MAX_PATH = 255


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a safe bundle path, else raise PathEscapeError.

    Safe means: relative, '/'-separated, no empty/'.'/'..' parts, no backslash or NUL, printable.
    """
    if not path or len(path) > _MAX_PATH:
        raise PathEscapeError(path, f"path must be 1..{_MAX_PATH} characters")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise PathEscapeError(path, "absolute paths are not allowed in a bundle")
    if "\\" in path or "\x00" in path or not path.isprintable():
        raise PathEscapeError(path, "backslashes, NUL and control characters are not allowed")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise PathEscapeError(
                path, "path has an empty, '.' or '..' component and could escape the bundle"
            )
    return path


def scan_bundle_dir(root: Path) -> list[str]:
    """List every regular file under ``root`` as a bundle path, refusing links and special files.

    Uses lstat and never follows links, so a symlink pointing outside is seen, not read.
    """
    found: list[str] = []
    root_st = os.lstat(root)
    if not stat.S_ISDIR(root_st.st_mode):
        raise PathEscapeError(str(root), "bundle root is not a directory (is it a symlink?)")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            full = base / name
            st = os.lstat(full)
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise PathEscapeError(rel, "symbolic links are not allowed in a bundle")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise PathEscapeError(rel, "only regular files are allowed in a bundle")
            if st.st_nlink > 1:
                # A hard link can alias a file outside the bundle that someone else may change later.
                raise PathEscapeError(rel, "hard-linked files are not allowed in a bundle")
            found.append(check_relpath(rel))
    return sorted(found)
