"""Keys, trust stores, and the `edgectl keys` / `edgectl artifact inspect` commands."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from edgectl.artifact import Artifact, KeyFileError, SigningKey, TrustStore, public_pem
from edgectl.artifact.signing import load_public_key, public_key_path
from edgectl.cli.artifact import app as artifact_app
from edgectl.cli.keys import app as keys_app

BuildFn = Callable[..., Artifact]
runner = CliRunner()


def test_key_id_is_sha256_of_raw_public_key() -> None:
    key = SigningKey.generate()
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.key_id == hashlib.sha256(raw).hexdigest()[:16]
    sig = key.sign(b"abc")
    assert sig.alg == "ed25519" and len(sig.sig) == 64
    assert key.sign(b"abc") == sig  # Ed25519 is deterministic: reproducible signature files


def test_save_load_and_permissions(tmp_path: Path) -> None:
    key = SigningKey.generate()
    pub = key.save(tmp_path / "signer.pem")
    assert pub == tmp_path / "signer.pub.pem" == public_key_path(tmp_path / "signer.pem")
    assert (tmp_path / "signer.pem").stat().st_mode & 0o777 == 0o600
    assert SigningKey.load(tmp_path / "signer.pem").key_id == key.key_id
    with pytest.raises(KeyFileError, match="already exists"):
        key.save(tmp_path / "signer.pem")
    os.chmod(tmp_path / "signer.pem", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        SigningKey.load(tmp_path / "signer.pem")
    with pytest.raises(KeyFileError, match="cannot read"):
        SigningKey.load(tmp_path / "absent.pem")


def test_a_service_key_may_be_group_readable_as_a_kubernetes_secret_mounts_it(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "fleet-key.pem")
    os.chmod(tmp_path / "fleet-key.pem", 0o440)  # root:fsGroup 0440, a Secret volume's default
    assert SigningKey.load(tmp_path / "fleet-key.pem", group_readable=True).key_id == key.key_id
    with pytest.raises(KeyFileError, match="chmod 600"):
        SigningKey.load(tmp_path / "fleet-key.pem")  # a user's own key stays ssh-strict
    os.chmod(tmp_path / "fleet-key.pem", 0o444)
    with pytest.raises(KeyFileError, match="chmod 600"):
        SigningKey.load(tmp_path / "fleet-key.pem", group_readable=True)  # everyone: never


def test_trust_store_from_dir_and_file(tmp_path: Path) -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    d = tmp_path / "trusted"
    d.mkdir()
    (d / "a.pem").write_bytes(public_pem(a.public_key))
    (d / "b.pub").write_bytes(public_pem(b.public_key))
    (d / "README").write_text("ignored")
    SigningKey.generate().save(d / "private.pem")  # private keys in a trust dir are skipped...
    os.unlink(d / "private.pub.pem")  # ...and so only a and b are trusted
    store = TrustStore.from_path(d)
    assert store.key_ids() == sorted([a.key_id, b.key_id]) and len(store) == 2
    assert a.key_id in store
    assert TrustStore.from_path(d / "a.pem").key_ids() == [a.key_id]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyFileError, match="no public keys"):
        TrustStore.from_path(empty)


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a PEM key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "x.pem")
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = ec_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyFileError, match="Ed25519 keys only"):
        load_public_key(pem, "ec.pem")


def test_keys_generate_cli(tmp_path: Path, _isolated_config: Path) -> None:
    res = runner.invoke(keys_app, ["generate", "--out", str(tmp_path / "k.pem"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert SigningKey.load(tmp_path / "k.pem").key_id == doc["key_id"]
    assert TrustStore.from_path(Path(doc["public_key"])).key_ids() == [doc["key_id"]]

    res = runner.invoke(keys_app, ["generate", "--out", str(tmp_path / "k.pem")])
    assert res.exit_code == 2 and "already exists" in res.output and "Traceback" not in res.output
    res = runner.invoke(keys_app, ["generate", "--out", str(tmp_path / "k.pem"), "--force"])
    assert res.exit_code == 0 and "key id:" in res.stdout

    res = runner.invoke(keys_app, ["generate"])  # the default key, under $EDGECTL_CONFIG_DIR
    assert res.exit_code == 0, res.output
    assert (_isolated_config / "keys" / "default.pem").stat().st_mode & 0o777 == 0o600


def test_inspect_valid_bundle(tmp_path: Path, build: BuildFn, signing_key: SigningKey) -> None:
    art = build(tmp_path / "b")
    tar = art.to_tar(tmp_path / "b.tar")
    pem = tmp_path / "signer.pub.pem"
    pem.write_bytes(public_pem(signing_key.public_key))
    for target in (art.root, tar):
        res = runner.invoke(
            artifact_app, ["inspect", str(target), "--trust", str(pem)], env={"COLUMNS": "200"}
        )
        assert res.exit_code == 0, res.output
        out = res.stdout
        for needle in (
            "resnet18",
            "3 (parent 2)",
            art.digest,
            signing_key.key_id,
            "(trusted)",
            "model.onnx",
            "golden.npz",
            "baseline_quality",
            "0.6976",
            "top1",
            "verified",
        ):
            assert needle in out, needle

    res = runner.invoke(artifact_app, ["inspect", str(tar), "--trust", str(pem), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["verified"] is True and doc["digest"] == art.digest and doc["version"] == 3
    assert doc["signers"] == [{"key_id": signing_key.key_id, "trusted": True}]
    assert doc["manifest"]["metrics"]["compressed_quality"] == 0.6951


def test_inspect_table_names_list_metrics_and_json_has_them_whole(
    tmp_path: Path, build: BuildFn, signing_key: SigningKey
) -> None:
    # compress records every trial and stage; a table row of their JSON ran for pages.
    trials = [{"name": "float (baseline)", "p50_ms": 0.04}, {"name": "int8-static QDQ", "p50_ms": 0.03}]
    art = build(tmp_path / "b", metrics={"quality_metric": "top1", "trials": trials})
    pem = tmp_path / "signer.pub.pem"
    pem.write_bytes(public_pem(signing_key.public_key))
    res = runner.invoke(artifact_app, ["inspect", str(art.root), "--trust", str(pem)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "2 entries (--json)" in res.stdout and "int8-static QDQ" not in res.stdout
    res = runner.invoke(artifact_app, ["inspect", str(art.root), "--trust", str(pem), "--json"])
    assert json.loads(res.stdout)["manifest"]["metrics"]["trials"] == trials


def test_inspect_says_what_is_wrong(
    tmp_path: Path, build: BuildFn, signing_key: SigningKey, flip: Callable[[Path, int], None]
) -> None:
    art = build(tmp_path / "b")
    pem = tmp_path / "signer.pub.pem"
    pem.write_bytes(public_pem(signing_key.public_key))

    res = runner.invoke(artifact_app, ["inspect", str(art.root)])  # default trust: an empty config dir
    assert res.exit_code != 0
    assert "NOT trusted" in res.stdout and "UntrustedKeyError" in res.stderr

    flip(art.root / "model.onnx", 1234)
    res = runner.invoke(artifact_app, ["inspect", str(art.root), "--trust", str(pem)])
    assert res.exit_code == 4
    assert "DigestMismatchError" in res.stderr and "model.onnx: chunk at offset 0" in res.stderr
    res = runner.invoke(artifact_app, ["inspect", str(art.root), "--trust", str(pem), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 4 and doc["verified"] is False and doc["error_type"] == "DigestMismatchError"

    res = runner.invoke(artifact_app, ["inspect", str(tmp_path / "missing.tar"), "--trust", str(pem)])
    assert res.exit_code != 0 and "does not exist" in res.stderr and "Traceback" not in res.output
    (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
    res = runner.invoke(artifact_app, ["inspect", str(tmp_path / "junk.tar"), "--trust", str(pem)])
    assert res.exit_code != 0 and "not a readable tar" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no escaped traceback
