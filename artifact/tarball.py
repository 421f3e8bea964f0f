"""The deterministic ``.tar`` form of a bundle, and a reader that refuses unsafe members.

Same content, same bytes: entries in a fixed order, mtime/uid/gid zeroed, owner names empty,
mode 0644, PAX format. ``manifest.json`` and ``manifest.sig.json`` come first, then the files
sorted by path, so a streaming reader can check the signature before it touches any file.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgectl.artifact.errors import PathEscapeError, TruncatedError
from edgectl.artifact.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edgectl.artifact.paths import check_relpath


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar(bundle_dir: Path, tar_path: Path, paths: list[str]) -> Path:
    """Pack ``paths`` (bundle-relative) of ``bundle_dir`` plus the manifest and signature into ``tar_path``."""
    order = [MANIFEST_NAME, SIGNATURE_NAME, *sorted(paths)]
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tar_path.parent, prefix=f".{tar_path.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for rel in order:
                src = bundle_dir / rel
                with src.open("rb") as fh:
                    tf.addfile(_info(rel, os.fstat(fh.fileno()).st_size), fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, tar_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tar_path


def safe_members(tf: tarfile.TarFile, source: str) -> Iterator[tarfile.TarInfo]:
    """Yield the tar's regular-file members, refusing links, devices, sparse files, unsafe and duplicate names.

    Directory entries are skipped (a bundle's directories are implied by its file paths).
    A tar that ends mid-header raises TruncatedError.
    """
    seen: set[str] = set()
    while True:
        try:
            member = tf.next()
        except (tarfile.ReadError, EOFError) as exc:
            raise TruncatedError(source, f"tar archive is damaged or cut short ({exc})") from exc
        if member is None:
            return
        name = member.name.removeprefix("./")
        if member.issym() or member.islnk():
            raise PathEscapeError(name, f"links are not allowed in a bundle (points to {member.linkname!r})")
        if member.isdir():
            check_relpath(name.rstrip("/"))
            continue
        if not member.isreg():
            raise PathEscapeError(name, "only regular files are allowed in a bundle")
        if member.issparse() or any(k.startswith("GNU.sparse") for k in member.pax_headers):
            # A sparse member unpacks to its full size (a 1.4 MB tar to 1 GiB); bundles never hold one.
            raise PathEscapeError(name, "sparse files are not allowed in a bundle")
        check_relpath(name)
        if name in seen:
            # A later duplicate would silently replace what was verified first.
            raise PathEscapeError(name, "the tar holds this path twice")
        seen.add(name)
        member.name = name
        yield member
