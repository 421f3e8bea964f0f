"""Security v2, row 11: `artifact push x.tar` of a crafted tar, against a real control plane.

The attack: a 1 GiB GNU-sparse member (the tar is a few KB) or an unlisted/oversized one, which
`push` used to unpack in full before anything was verified. Now every member must be a file the
signed manifest lists, at its listed size, and not sparse, before a byte of it is written.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from edgectl.artifact.builder import Artifact
from edgectl.artifact.errors import PathEscapeError
from edgectl.artifact.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edgectl.client import ControlPlaneClient, _bundle_files, push_artifact
from edgectl.errors import UsageError
from tests.control_plane.conftest import build, client, cp, cp_factory

__all__ = ["build", "client", "cp", "cp_factory"]
GIB = 1 << 30


def _gnu_tar(tar: Path, src: Path, names: list[str]) -> Path:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to craft a sparse member")
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(src), *names], check=True)
    return tar


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def test_row11_sparse_unlisted_and_oversized_members_are_refused_before_unpacking(
    build: Callable[..., Artifact], client: ControlPlaneClient, tmp_path: Path
) -> None:
    art = build(name="tarred")
    ok = art.to_tar(tmp_path / "ok.tar")
    pushed = push_artifact(client, ok)  # positive control: the tar `compress` writes pushes fine
    assert pushed.artifact.ref.digest == art.digest and not pushed.already_present

    def crafted(name: str, extra: dict[str, Callable[[Path], None]]) -> Path:
        src = tmp_path / f"src-{name}"
        src.mkdir()
        for reserved in (MANIFEST_NAME, SIGNATURE_NAME, "model.onnx"):
            shutil.copyfile(art.root / reserved, src / reserved)
        for member, make in extra.items():
            make(src / member)
        order = [
            MANIFEST_NAME,
            SIGNATURE_NAME,
            *extra,
            *(["model.onnx"] if "model.onnx" not in extra else []),
        ]
        return _gnu_tar(tmp_path / f"{name}.tar", src, order)

    def hole(size: int) -> Callable[[Path], None]:
        def make(path: Path) -> None:
            with path.open("wb") as f:
                f.truncate(size)

        return make

    sparse_unlisted = crafted("bomb", {"bomb.bin": hole(GIB)})
    assert sparse_unlisted.stat().st_size < 2 << 20  # a tiny tar that would unpack to 1 GiB
    sparse_listed = crafted("listed", {"model.onnx": hole(art.manifest.files[0].size)})
    oversized = crafted(
        "big", {"model.onnx": lambda p: p.write_bytes(b"x" * (art.manifest.files[0].size + 1))}
    )
    unlisted = crafted("extra", {"extra.bin": lambda p: p.write_bytes(b"not in the manifest")})
    refusals = {
        sparse_unlisted: "sparse",
        sparse_listed: "sparse",
        oversized: "another size",
        unlisted: "not listed",
    }
    for tar, why in refusals.items():
        workdir = tmp_path / f"unpacked-{tar.stem}"
        workdir.mkdir()
        with pytest.raises((UsageError, PathEscapeError), match=why):
            _bundle_files(tar, workdir, art.manifest)
        assert _disk_bytes(workdir) < 1 << 20, f"{tar.name} wrote {_disk_bytes(workdir)} bytes before refusal"
    # And the command itself, with a manifest the server has not seen (else it skips unpacking).
    fresh = build(name="tarred", version=2)
    src = tmp_path / "src-fresh"
    shutil.copytree(fresh.root, src)
    hole(GIB)(src / "bomb.bin")
    bomb = _gnu_tar(
        tmp_path / "fresh-bomb.tar", src, [MANIFEST_NAME, SIGNATURE_NAME, "bomb.bin", "model.onnx"]
    )
    with pytest.raises((UsageError, PathEscapeError), match="sparse"):
        push_artifact(client, bomb)
