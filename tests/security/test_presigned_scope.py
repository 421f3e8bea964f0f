"""Presigned chunk URLs are the bytes, so they follow the device's artifact scope (row 13 for URLs).

A real secured control plane keeps its blobs in moto's S3 server; an enrolled device calls over
mTLS, as its agent does. It gets URLs for the artifact its desired state names, and they open
the chunks (the positive control); for any other artifact it gets PERMISSION_DENIED and no URL.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgectl.artifact import Manifest, all_chunk_digests, sha256_digest
from edgectl.client import push_artifact
from edgectl.protos.v1 import artifacts_pb2 as AP
from edgectl.protos.v1 import artifacts_pb2_grpc
from edgectl.security.tokens import Role
from tests.agent.onnx_models import mlp_artifact
from tests.conftest import S3Endpoint
from tests.security.conftest import SecuredFleet, secured_fleet


@pytest.fixture
def fleet(tmp_path: Path, moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecuredFleet]:
    for name, value in (
        ("EDGECTL_S3_ENDPOINT", moto_s3.url),
        ("AWS_ACCESS_KEY_ID", moto_s3.access_key),
        ("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key),
        ("AWS_DEFAULT_REGION", moto_s3.region),
    ):
        monkeypatch.setenv(name, value)  # fmt: skip
    bucket = f"scope-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    with secured_fleet(tmp_path, blobs=f"s3://{bucket}/fleet", blob_url_ttl_s=60) as fleet:
        yield fleet


def _code(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details() or ""


def test_a_device_gets_chunk_urls_only_for_what_was_deployed_to_it(fleet: SecuredFleet) -> None:
    creds, key_pem = fleet.enroll("cam-1")
    digests, manifests = {}, {}
    with fleet.client(fleet.token(Role.DEPLOYER, "ci")) as deployer:
        for name in ("one", "two"):
            seeds = (1, 2) if name == "one" else (7, 8)  # two shares no weights with one
            art = mlp_artifact(fleet.work / f"art-{name}", fleet.work, fleet.key, name=name, seeds=seeds)
            digests[name] = push_artifact(deployer, art.root).artifact.ref.digest
            manifests[name] = Manifest.from_bytes((art.root / "manifest.json").read_bytes())
    fleet.roll_out("cam-1", digests["one"], ring="s3")  # the desired state names `one`
    device = artifacts_pb2_grpc.ArtifactServiceStub(fleet.device_channel(creds.client_cert_pem, key_pem))
    # Positive control: URLs for the deployed artifact, and each opens exactly its chunk.
    one = sorted(all_chunk_digests(manifests["one"]))
    answer = device.GetChunkUrls(AP.GetChunkUrlsRequest(digest=digests["one"], chunks=one), timeout=10)
    assert [u.chunk_digest for u in answer.urls] == one
    assert time.time() < answer.expires_at.seconds <= time.time() + 61
    for u in answer.urls:
        assert "X-Amz-Credential" in u.url and fleet.cp.security is not None
        with urllib.request.urlopen(u.url, timeout=10) as resp:
            assert sha256_digest(resp.read()) == u.chunk_digest
    # The attack: URLs for an artifact never deployed to this device, by digest (its real chunks).
    two = sorted(all_chunk_digests(manifests["two"]))
    code, message = _code(
        lambda: device.GetChunkUrls(AP.GetChunkUrlsRequest(digest=digests["two"], chunks=two), timeout=10)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not deployed" in message
    # Nor by naming the deployed artifact and another's chunks: only the manifest's chunks are signed.
    only_two = sorted(set(two) - set(one))[0]
    code, _ = _code(
        lambda: device.GetChunkUrls(
            AP.GetChunkUrlsRequest(digest=digests["one"], chunks=[only_two]), timeout=10
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # The manifest answer that carries the URLs (want_chunk_urls) is scoped the same way: the
    # deployed artifact's chunks, each once, and nothing, not even the manifest, for another.
    art = device.Get(AP.GetArtifactRequest(artifact=digests["one"], want_chunk_urls=True), timeout=10)
    assert sorted(u.chunk_digest for u in art.chunk_urls) == one
    assert {u.url for u in art.chunk_urls} == {u.url for u in answer.urls}  # the same signed URLs
    code, message = _code(
        lambda: device.Get(AP.GetArtifactRequest(artifact=digests["two"], want_chunk_urls=True), timeout=10)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not deployed" in message
