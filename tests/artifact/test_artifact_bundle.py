"""Building, loading and attacking bundles: every check that protects a device is exercised."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgectl.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Artifact,
    ArtifactError,
    DigestMismatchError,
    ManifestError,
    PathEscapeError,
    RollbackError,
    SignatureError,
    SigningKey,
    TrtEngine,
    TruncatedError,
    TrustStore,
    UnlistedFileError,
    UntrustedKeyError,
    add_signatures,
    canonical_bytes,
    ensure_newer,
    is_newer,
    load_artifact,
    verify_bundle,
    verify_manifest,
)
from edgectl.artifact.signing import encode_signatures

BuildFn = Callable[..., Artifact]
Flip = Callable[[Path, int], None]


def test_build_then_load_dir_and_tar(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    art = build(tmp_path / "b")
    assert art.digest.startswith("sha256:") and len(art.digest) == 71
    loaded = load_artifact(art.root, trust)
    assert loaded.digest == art.digest
    assert loaded.manifest == art.manifest
    assert loaded.model_path.read_bytes() == (art.root / "model.onnx").read_bytes()
    ins, outs = loaded.golden()
    assert ins["input"].shape == (1, 3, 4, 4) and outs["logits"].dtype == np.float32

    tar = art.to_tar(tmp_path / "b.tar")
    extracted = load_artifact(tar, trust, extract_to=tmp_path / "x")
    assert extracted.digest == art.digest
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(
        ["golden.npz", "model.onnx", MANIFEST_NAME, SIGNATURE_NAME]
    )
    # An extracted bundle is itself a valid bundle directory.
    assert load_artifact(tmp_path / "x", trust).digest == art.digest


def test_manifest_content(tmp_path: Path, build: BuildFn) -> None:
    m = build(tmp_path / "b").manifest
    assert (m.name, m.version, m.parent_version) == ("resnet18", 3, 2)
    assert m.inputs[0].shape == ("batch", 3, 4, 4)
    assert m.golden.file == "golden.npz" and m.golden.atol > 0
    assert [f.path for f in m.files] == ["golden.npz", "model.onnx"]
    model = m.file("model.onnx")
    assert model.size == 3 * 1024 * 1024 and sum(c.size for c in model.chunks) == model.size
    assert m.producer.host == "builder-1"
    raw = json.loads((tmp_path / "b" / MANIFEST_NAME).read_bytes())
    assert raw["metrics"]["baseline_quality"] == 0.6976
    assert raw["precision"] == {"/conv1/Conv": "int8", "/fc/Gemm": "fp32"}


def test_same_content_same_digest_and_tar_bytes(tmp_path: Path, build: BuildFn) -> None:
    a = build(tmp_path / "one")
    b = build(tmp_path / "two")
    assert a.digest == b.digest
    assert (a.root / SIGNATURE_NAME).read_bytes() == (b.root / SIGNATURE_NAME).read_bytes()
    assert a.to_tar(tmp_path / "one.tar").read_bytes() == b.to_tar(tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == [MANIFEST_NAME, SIGNATURE_NAME, "golden.npz", "model.onnx"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    # Different content, different identity.
    assert build(tmp_path / "three", version=4).digest != a.digest


def test_any_byte_of_any_file_is_caught(
    tmp_path: Path, build: BuildFn, trust: TrustStore, flip: Flip
) -> None:
    root = build(tmp_path / "b").root
    for name in ("model.onnx", "golden.npz", MANIFEST_NAME, SIGNATURE_NAME):
        size = (root / name).stat().st_size
        for offset in sorted({0, size // 3, size // 2, size - 1}):
            flip(root / name, offset)
            with pytest.raises(ArtifactError) as info:
                load_artifact(root, trust)
            assert name in str(info.value), (name, offset, str(info.value))
            flip(root / name, offset)  # restore
    assert load_artifact(root, trust).digest  # restored bundle is valid again


def test_tampered_model_names_the_file_and_chunk(
    tmp_path: Path, build: BuildFn, trust: TrustStore, flip: Flip
) -> None:
    art = build(tmp_path / "b")
    chunk = art.manifest.file("model.onnx").chunks[2]
    flip(art.root / "model.onnx", chunk.offset + 5)
    with pytest.raises(DigestMismatchError, match=rf"model.onnx: chunk at offset {chunk.offset}") as info:
        load_artifact(art.root, trust)
    assert info.value.path == "model.onnx"


def test_tampered_tar_member_is_caught(tmp_path: Path, build: BuildFn, trust: TrustStore, flip: Flip) -> None:
    tar = build(tmp_path / "b").to_tar(tmp_path / "b.tar")
    with tarfile.open(tar) as tf:
        member = tf.getmember("model.onnx")
    flip(tar, member.offset_data + member.size // 2)
    with pytest.raises(DigestMismatchError, match=r"model\.onnx"):
        verify_bundle(tar, trust)
    with pytest.raises(DigestMismatchError):
        load_artifact(tar, trust, extract_to=tmp_path / "x")
    assert not (tmp_path / "x").exists(), "a failed load must leave nothing extracted"


def test_unknown_key_is_rejected(tmp_path: Path, build: BuildFn) -> None:
    root = build(tmp_path / "b").root
    stranger = TrustStore([SigningKey.generate().public_key])
    with pytest.raises(UntrustedKeyError, match="not a trusted key"):
        load_artifact(root, stranger)
    with pytest.raises(UntrustedKeyError):
        load_artifact(root, TrustStore())


def test_rotation_signature_by_new_and_old_key(
    tmp_path: Path, build: BuildFn, signing_key: SigningKey, trust: TrustStore
) -> None:
    art = build(tmp_path / "b")
    new_key = SigningKey.generate()
    add_signatures(art.root, [new_key])
    # Digest unchanged: signatures are outside the digested bytes.
    assert load_artifact(art.root, trust).digest == art.digest
    only_new = TrustStore([new_key.public_key])
    assert load_artifact(art.root, only_new).verified.signers == (new_key.key_id,)
    both = TrustStore([signing_key.public_key, new_key.public_key])
    assert set(load_artifact(art.root, both).verified.signers) == {signing_key.key_id, new_key.key_id}


def test_forged_signature_by_trusted_key_id_is_rejected(
    tmp_path: Path, build: BuildFn, signing_key: SigningKey, trust: TrustStore
) -> None:
    art = build(tmp_path / "b")
    forged = SigningKey.generate().sign(art.manifest_bytes)
    forged = type(forged)(signing_key.key_id, forged.alg, forged.sig)  # claims the trusted key's id
    (art.root / SIGNATURE_NAME).write_bytes(encode_signatures(art.manifest_bytes, [forged]))
    with pytest.raises(SignatureError, match="does not verify"):
        load_artifact(art.root, trust)


def test_missing_signature_and_manifest(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    root = build(tmp_path / "b").root
    (root / SIGNATURE_NAME).unlink()
    with pytest.raises(SignatureError, match=SIGNATURE_NAME):
        load_artifact(root, trust)
    (root / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        load_artifact(root, trust)


def test_verify_manifest_over_the_wire(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    art = build(tmp_path / "b")
    sig = (art.root / SIGNATURE_NAME).read_bytes()
    vm = verify_manifest(art.manifest_bytes, sig, trust)
    assert vm.digest == art.digest and vm.manifest.version == 3
    # Re-serialised (same meaning, different bytes) must not verify: one manifest, one digest.
    pretty = json.dumps(json.loads(art.manifest_bytes), indent=1).encode()
    with pytest.raises(SignatureError):
        verify_manifest(pretty, sig, trust)


def test_signed_manifest_with_escaping_path_is_rejected(
    tmp_path: Path, build: BuildFn, signing_key: SigningKey, trust: TrustStore
) -> None:
    # Even a manifest signed by a trusted key may not name a path outside the bundle.
    doc = json.loads(build(tmp_path / "b").manifest_bytes)
    doc["files"][1]["path"] = "../model.onnx"
    doc["model_file"] = "../model.onnx"
    doc["files"].sort(key=lambda f: f["path"])
    raw = canonical_bytes(doc)
    sig = encode_signatures(raw, [signing_key.sign(raw)])
    with pytest.raises(PathEscapeError, match="could escape"):
        verify_manifest(raw, sig, trust)


def test_bundle_root_may_be_a_link(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    art = build(tmp_path / "v3")
    os.symlink(art.root, tmp_path / "current")  # how an agent may point at the live version
    assert load_artifact(tmp_path / "current", trust).digest == art.digest


def test_symlink_in_dir_bundle_is_rejected(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    root = build(tmp_path / "b").root
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    os.symlink(secret, root / "extra")
    with pytest.raises(PathEscapeError, match="symbolic links"):
        load_artifact(root, trust)
    os.unlink(root / "extra")
    # A listed file replaced by a symlink to identical bytes is still refused.
    target = tmp_path / "model-copy"
    target.write_bytes((root / "model.onnx").read_bytes())
    (root / "model.onnx").unlink()
    os.symlink(target, root / "model.onnx")
    with pytest.raises(PathEscapeError, match=r"model\.onnx"):
        load_artifact(root, trust)


def test_extra_missing_and_short_files(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    root = build(tmp_path / "b").root
    (root / "notes.txt").write_text("hello")
    with pytest.raises(UnlistedFileError, match=r"notes\.txt"):
        load_artifact(root, trust)
    (root / "notes.txt").unlink()

    data = (root / "model.onnx").read_bytes()
    (root / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedError, match=r"model\.onnx"):
        load_artifact(root, trust)
    (root / "model.onnx").write_bytes(data + b"\0")
    with pytest.raises(DigestMismatchError, match="longer"):
        load_artifact(root, trust)
    (root / "model.onnx").unlink()
    with pytest.raises(TruncatedError, match=r"model\.onnx.*missing"):
        load_artifact(root, trust)


def _tar_with(tmp_path: Path, good_tar: Path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """Copy a valid bundle tar and append hostile members."""
    out = tmp_path / "hostile.tar"
    with tarfile.open(good_tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        for info, data in extra:
            dst.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


@pytest.mark.parametrize(
    ("name", "kind", "match"),
    [
        ("../evil.sh", tarfile.REGTYPE, "could escape"),
        ("sub/../../evil.sh", tarfile.REGTYPE, "could escape"),
        ("/etc/evil.sh", tarfile.REGTYPE, "absolute"),
        ("link", tarfile.SYMTYPE, "links are not allowed"),
        ("hard", tarfile.LNKTYPE, "links are not allowed"),
        ("fifo", tarfile.FIFOTYPE, "only regular files"),
        ("model.onnx", tarfile.REGTYPE, "twice"),
    ],
)
def test_hostile_tar_members_are_rejected(
    tmp_path: Path, build: BuildFn, trust: TrustStore, name: str, kind: bytes, match: str
) -> None:
    good = build(tmp_path / "b").to_tar(tmp_path / "b.tar")
    info = tarfile.TarInfo(name)
    info.type = kind
    data = b"#!/bin/sh\nrm -rf /\n"
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    else:
        info.linkname = "/etc/passwd"
    hostile = _tar_with(tmp_path, good, [(info, data)])
    with pytest.raises(PathEscapeError, match=match):
        load_artifact(hostile, trust, extract_to=tmp_path / "x")
    assert not (tmp_path / "evil.sh").exists()
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_truncated_tar_is_rejected(tmp_path: Path, build: BuildFn, trust: TrustStore) -> None:
    tar = build(tmp_path / "b").to_tar(tmp_path / "b.tar")
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        model = tf.getmember("model.onnx")
    cuts = [
        100,
        model.offset_data + 10,
        model.offset_data + model.size // 2,
        model.offset_data + model.size - 1,
    ]
    for cut in cuts:
        short = tmp_path / f"cut-{cut}.tar"
        short.write_bytes(data[:cut])
        with pytest.raises(TruncatedError):
            load_artifact(short, trust, extract_to=tmp_path / f"x-{cut}")
        assert not (tmp_path / f"x-{cut}").exists()


def test_not_a_bundle(tmp_path: Path, trust: TrustStore) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_artifact(tmp_path / "nope", trust)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello, this is not a tar file at all" * 20)
    with pytest.raises(TruncatedError, match="not a readable tar"):
        load_artifact(junk, trust)


def test_engines_and_lookup(tmp_path: Path, build: BuildFn, trust: TrustStore, model_file: Path) -> None:
    engine = tmp_path / "orin.plan"
    engine.write_bytes(b"\x01" * 1000)
    spec = TrtEngine("engines/jetson-orin/trt10.3-sm87.plan", "jetson-orin", "10.3", "8.7")
    art = build(
        tmp_path / "b",
        files={"model.onnx": model_file, spec.file: engine},
        trt_engines=[spec],
        engine_build_on_device=False,
    )
    loaded = load_artifact(art.to_tar(tmp_path / "b.tar"), trust)
    found = loaded.engine_for("jetson-orin", "10.3", "8.7")
    assert found is not None and found.read_bytes() == engine.read_bytes()
    assert loaded.engine_for("jetson-orin", "10.3", "7.2") is None
    assert loaded.manifest.engine_build_on_device is False


def test_build_rejects_bad_input(tmp_path: Path, build: BuildFn, model_file: Path) -> None:
    with pytest.raises(ManifestError, match="positive integer"):
        build(tmp_path / "a", version=0)
    with pytest.raises(ManifestError, match="newer than parent"):
        build(tmp_path / "b", version=2, parent_version=2)
    with pytest.raises(ManifestError, match="golden inputs"):
        build(tmp_path / "c", golden_inputs={"wrong": np.zeros((1, 3, 4, 4), np.float32)})
    with pytest.raises(ManifestError, match="shape"):
        build(tmp_path / "d", golden_inputs={"input": np.zeros((1, 3, 5, 4), np.float32)})
    with pytest.raises(ManifestError, match="precision"):
        build(tmp_path / "e", precision_map={"n": "int4"})
    with pytest.raises(ManifestError, match=r"metrics\.latency_ms"):
        build(tmp_path / "f", metrics={"latency_ms": "fast"})
    with pytest.raises(ManifestError, match="canonical JSON"):
        build(tmp_path / "g", metrics={"latency_ms": float("nan")})
    with pytest.raises(PathEscapeError):
        build(tmp_path / "h", files={"model.onnx": model_file, "../x": model_file})
    with pytest.raises(ManifestError, match="does not list"):
        build(tmp_path / "i", files={"net.onnx": model_file})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ManifestError, match="not empty"):
        build(tmp_path / "full")


def test_default_key_is_made_on_first_use(tmp_path: Path, build: BuildFn, _isolated_config: Path) -> None:
    from edgectl.artifact import default_signing_key, default_trust_store

    art = build(tmp_path / "b", signing_key=None)
    key_file = _isolated_config / "keys" / "default.pem"
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    assert default_signing_key().key_id == default_signing_key().key_id  # reused, not regenerated
    assert load_artifact(art.root, default_trust_store()).verified.signers == (default_signing_key().key_id,)


def test_version_ordering() -> None:
    assert is_newer(2, 1) and is_newer(1, None)
    assert not is_newer(1, 1) and not is_newer(1, 2)
    ensure_newer(5, 4)
    with pytest.raises(RollbackError, match="not newer"):
        ensure_newer(4, 5)
    with pytest.raises(ManifestError):
        is_newer(True, 1)  # type: ignore[arg-type]
    with pytest.raises(ManifestError):
        is_newer(-1, None)
