"""What the presigned-URL tests share: a fresh bucket on moto's S3 server, a control plane on it,
artifacts pushed to it, and fetchers made of the agent's own transports."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgectl.agent.fetch import ArtifactFetcher, FetchReport, FetchSettings
from edgectl.agent.presigned import PresignedTransport
from edgectl.agent.transports import ArtifactTransport, GrpcTransport
from edgectl.artifact import (
    LocalBlobStore,
    Manifest,
    SigningKey,
    TrustStore,
    chunk_sizes,
)  # fmt: skip
from edgectl.artifact.s3store import PUBLIC_ENDPOINT_ENV
from edgectl.broker import MosquittoProcess
from edgectl.client import push_artifact
from tests.agent.onnx_models import mlp_artifact
from tests.conftest import S3Endpoint
from tests.contracts.conftest import RealControlPlane
from tests.faults.proxy import TcpProxy

DIMS = (64, 1024, 512, 8)  # ~2.3 MB of weights: several chunks


@dataclass
class Bucket:
    """A fresh bucket on the session's moto server; the control plane keeps blobs under ``fleet/``."""

    name: str
    s3: Any  # a boto3 client with the bucket's credentials (the device never has them)

    @property
    def url(self) -> str:
        return f"s3://{self.name}/fleet"

    def key(self, digest: str) -> str:
        return f"fleet/sha256/{digest.removeprefix('sha256:')}"


@pytest.fixture
def bucket(moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    monkeypatch.setenv("EDGECTL_S3_ENDPOINT", moto_s3.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_s3.region)
    made = Bucket(f"presign-{uuid.uuid4().hex[:12]}", moto_s3.client())
    made.s3.create_bucket(Bucket=made.name)
    return made


@pytest.fixture
def proxy(moto_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """The device's path to the bucket: URLs are signed for this proxy (the public endpoint)."""
    host, port = moto_s3.url.removeprefix("http://").rsplit(":", 1)
    made = TcpProxy(host, int(port))
    monkeypatch.setenv(PUBLIC_ENDPOINT_ENV, f"http://{made.address}")
    yield made
    made.close()


@contextlib.contextmanager
def plane_on(
    tmp: Path, broker: MosquittoProcess, trust: TrustStore, blobs: str
) -> Iterator[RealControlPlane]:
    made = RealControlPlane(tmp / "cp", broker, trust, blobs=blobs)
    try:
        yield made
    finally:
        made.close()


@dataclass
class Built:
    digest: str
    manifest: Manifest

    @property
    def size(self) -> int:
        return sum(chunk_sizes(self.manifest).values())


def push(plane: RealControlPlane, tmp: Path, key: SigningKey, version: int, seeds: tuple[int, ...]) -> Built:
    art = mlp_artifact(tmp / f"v{version}", tmp / "models", key, version=version, dims=DIMS, seeds=seeds)
    digest = push_artifact(plane.client, art.root).artifact.ref.digest
    return Built(digest, Manifest.from_bytes((art.root / "manifest.json").read_bytes()))


def make_fetcher(
    tmp: Path, plane: RealControlPlane, *, allow_http: bool = True, fallback: bool = True
) -> ArtifactFetcher:
    grpc_transport = GrpcTransport(plane.address, timeout_s=10)
    transports: list[ArtifactTransport] = [
        PresignedTransport(grpc_transport, allow_http=allow_http, timeout_s=5)
    ]
    if fallback:
        transports.append(grpc_transport)
    return ArtifactFetcher(
        LocalBlobStore(tmp / "device-chunks"), transports, FetchSettings(retry_base_s=0.05, retry_max_s=0.2)
    )


def fetch(f: ArtifactFetcher, built: Built) -> FetchReport:
    f.get_manifest(built.digest)
    return f.fetch(built.digest, built.manifest)
