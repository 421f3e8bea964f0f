"""Artifacts made by this edgectl are accepted by agents of the release before the drift summary.

That release's ``Manifest.from_bytes`` rebuilt the manifest from the fields it knew and refused
the bytes unless they re-encoded exactly, so any field it did not know (anywhere) refused the
whole artifact. Two honest stand-ins for that agent: its field sets, frozen here (always run),
and its own ``artifact/manifest.py`` checked out of git history (run where the history is there).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from edgectl.artifact import (
    MANIFEST_NAME,
    Artifact,
    TrustStore,
    canonical_bytes,
    load_artifact,
    parse_canonical,
    summarize_inputs,
)
from edgectl.artifact.drift import SUMMARY_FILE
from tests.artifact.conftest import BuildFn

ROOT = Path(__file__).resolve().parents[2]
# The commit that put the summary into the manifest; its parent is the release before it.
SUMMARY_COMMIT = "bdc8438"

# Every object the previous release's manifest reader parsed, and exactly the keys it wrote back
# (artifact/manifest.py at SUMMARY_COMMIT^): a key outside these sets made it refuse the artifact.
OLD_FIELDS: dict[str, frozenset[str]] = {
    kind: frozenset(keys.split())
    for kind, keys in {
        "manifest": "format name version parent_version created producer source_model_sha256 recipe "
        "target_profile inputs outputs metrics precision golden model_file trt_engines "
        "engine_build_on_device files",
        "producer": "edgectl_version host",
        "tensor": "name dtype shape",
        "golden": "file atol rtol min_cosine",
        "file": "path size sha256 chunks",
        "chunk": "offset size sha256",
        "engine": "file device_class trt_version compute_capability",
    }.items()
}


def old_release_refusal(raw: bytes) -> str | None:
    """Why the previous release's reader refuses these manifest bytes, or None when it accepts them."""
    doc = parse_canonical(raw)
    objects: list[tuple[str, Any]] = [
        ("manifest", doc),
        ("producer", doc.get("producer")),
        ("golden", doc.get("golden")),
    ]
    objects += [("tensor", t) for t in (*doc.get("inputs", []), *doc.get("outputs", []))]
    objects += [("engine", e) for e in doc.get("trt_engines", [])]
    for f in doc.get("files", []):
        objects += [("file", f), *(("chunk", c) for c in f.get("chunks", []))]
    for kind, obj in objects:
        keys = set(obj) if isinstance(obj, dict) else set()
        if keys != OLD_FIELDS[kind]:
            return f"{kind} has fields {sorted(keys ^ OLD_FIELDS[kind])} it does not know or misses"
    listed = {f["path"] for f in doc["files"]}
    if doc["model_file"] not in listed or doc["golden"]["file"] not in listed:
        return "a file it needs is not listed"
    return None


def _with_summary(tmp_path: Path, build: BuildFn) -> Artifact:
    calib = {"input": np.random.default_rng(3).random((64, 3, 4, 4)).astype(np.float32)}
    return build(tmp_path / "new", input_summary=summarize_inputs(calib))


def test_the_previous_release_accepts_an_artifact_with_a_summary(
    tmp_path: Path, build: BuildFn, trust: TrustStore
) -> None:
    art = _with_summary(tmp_path, build)
    raw = (art.root / MANIFEST_NAME).read_bytes()
    assert old_release_refusal(raw) is None
    # The stand-in has teeth: the summary as a manifest field (this wave's first form) is refused.
    inline = json.loads(raw)
    inline["input_summary"] = json.loads((art.root / SUMMARY_FILE).read_bytes())
    assert "input_summary" in (old_release_refusal(canonical_bytes(inline)) or "")
    # ... while this release reads both the summary and the manifest it came with.
    assert load_artifact(art.root, trust).input_summary() is not None


def _old_manifest_module(tmp_path: Path) -> ModuleType:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git history here; the frozen field sets above stand in for the old reader")
    got = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{SUMMARY_COMMIT}^:artifact/manifest.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    if got.returncode != 0:
        pytest.skip(f"commit {SUMMARY_COMMIT} is not in this clone (shallow?): {got.stderr.strip()}")
    path = tmp_path / "old_manifest.py"
    path.write_text(got.stdout)
    spec = importlib.util.spec_from_file_location("edgectl_old_manifest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_previous_release_code_from_git_history_accepts_it(tmp_path: Path, build: BuildFn) -> None:
    old = _old_manifest_module(tmp_path)
    art = _with_summary(tmp_path, build)
    raw = (art.root / MANIFEST_NAME).read_bytes()
    manifest = old.Manifest.from_bytes(raw)
    assert manifest.to_bytes() == raw and SUMMARY_FILE in {f.path for f in manifest.files}
    inline = json.loads(raw)
    inline["input_summary"] = {"format": "edgectl.input-summary/v1", "inputs": []}
    with pytest.raises(Exception, match="does not know"):
        old.Manifest.from_bytes(canonical_bytes(inline))
