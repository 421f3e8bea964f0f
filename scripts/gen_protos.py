"""Regenerate (or check) the Python modules of protos/ from its .proto files.

The .proto files import each other as ``edgectl/protos/...``, so generated code imports
``edgectl.protos...``, the installed name. protoc runs in a staging tree that gives the
folder that name. ``--check`` regenerates into a temporary folder and fails, listing the
files, when the committed modules differ: the test suite runs it.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    """Every .proto under protos/, relative to it, in a stable order."""
    return sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))


def generate(out_root: Path) -> Path:
    """Run protoc into ``out_root``; returns the folder that mirrors protos/."""
    stage = out_root / "edgectl" / "protos"
    for rel in proto_files():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROTOS / rel, stage / rel)
    include = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{out_root}", f"-I{include}",
        f"--python_out={out_root}", f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}", f"--mypy_grpc_out={out_root}",
        *[f"edgectl/protos/{rel.as_posix()}" for rel in proto_files()],
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)
    for module in sorted((stage / "inference").glob("*_pb2.py")):
        use_private_pool(module)
    return stage


def use_private_pool(module: Path) -> None:
    """Register a V2 module's descriptors in ``protos/inference/_pool.py``'s pool, not the default.

    tritonclient defines the same ``inference.*`` names in the default pool (other file names), so
    both could not be imported in one process; a pool of our own keeps them apart.
    """
    text = module.read_text()
    default = "_descriptor_pool.Default().AddSerializedFile("
    marker = "# @@protoc_insertion_point(imports)\n"
    if text.count(default) != 1 or marker not in text:
        raise SystemExit(f"{module.name}: protoc's output changed shape; update use_private_pool()")
    text = text.replace(default, "_V2_POOL.AddSerializedFile(")
    text = text.replace(marker, marker + "from edgectl.protos.inference._pool import V2_POOL as _V2_POOL\n")
    module.write_text(text)


def generated_files(root: Path) -> list[Path]:
    """Generated modules under ``root``, relative to it."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed modules are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stage = generate(Path(tmp))
        fresh = generated_files(stage)
        committed = generated_files(PROTOS)
        if args.check:
            stale = [
                str(f)
                for f in fresh
                if not (PROTOS / f).exists() or not filecmp.cmp(stage / f, PROTOS / f, shallow=False)
            ]
            stale += [f"{f} (no longer generated)" for f in committed if f not in fresh]
            if stale:
                print("protos/ is stale; run `make proto`. Differs: " + ", ".join(stale), file=sys.stderr)
                return 1
            print(f"protos/ is up to date ({len(fresh)} generated modules)")
            return 0
        for f in committed:
            if f not in fresh:
                (PROTOS / f).unlink()
        for f in fresh:
            shutil.copy2(stage / f, PROTOS / f)
        print(f"generated {len(fresh)} modules under protos/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
