"""A small gRPC client for the control plane, shared by the CLI commands.

Finds the server (``--server`` → ``EDGECTL_SERVER`` → ``config.toml`` → the ``endpoints.json``
that `edgectl up` writes) and its credentials the same way (``--token``/``EDGECTL_TOKEN``/
``token``, ``--ca``/``EDGECTL_CA``/``ca``), turns a gRPC failure into one clear
:class:`RemoteError` line, and pushes artifact bundles resumably (PlanUpload, then only the
chunks the server lacks). A token is never sent over plaintext and never printed.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edgectl.addresses import parse_host_port
from edgectl.artifact.chunking import chunk_locations
from edgectl.artifact.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from edgectl.artifact.tarball import safe_members
from edgectl.artifact.verify import read_unverified
from edgectl.contexts import CliConfig
from edgectl.endpoints import Endpoints
from edgectl.errors import EdgectlError, UsageError
from edgectl.protos.v1 import artifacts_pb2, artifacts_pb2_grpc, fleet_pb2_grpc, rollouts_pb2_grpc

SERVER_ENV = "EDGECTL_SERVER"
TOKEN_ENV = "EDGECTL_TOKEN"
CA_ENV = "EDGECTL_CA"
ENROLL_TOKEN_ENV = "EDGECTL_ENROLL_TOKEN"  # an agent's one-time token: env or file, never argv
T = TypeVar("T")
# Exit codes by gRPC status, so scripts can tell "fix your input" from "try again later".
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.NOT_FOUND: 6,
    grpc.StatusCode.FAILED_PRECONDITION: 7,
    grpc.StatusCode.PERMISSION_DENIED: 8,
    grpc.StatusCode.UNAUTHENTICATED: 8,
    grpc.StatusCode.UNAVAILABLE: 9,
    grpc.StatusCode.DEADLINE_EXCEEDED: 9,
}


class RemoteError(EdgectlError):
    """The control plane refused or failed a call; the message is its own, one line."""

    def __init__(self, code: grpc.StatusCode, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{code.name.lower().replace('_', ' ')}: {message}", hint=hint)
        self.code = code
        self.exit_code = EXIT_CODES.get(code, 1)


def _from_config(key: str = "server") -> str | None:
    """``key`` from config.toml's context in force (``edgectl config use-context``) or its defaults."""
    return CliConfig.load().value(key)


def _config_token() -> str | None:
    """A token config.toml names, literally or (better) by ``token_file``."""
    literal = _from_config("token")
    if literal:
        return literal
    token_file = _from_config("token_file")
    if not token_file:
        return None
    try:
        return Path(token_file).expanduser().read_text().strip() or None
    except OSError as exc:
        raise UsageError(
            f"cannot read the token file {token_file} named in {CliConfig.path()}: {exc.strerror}",
            hint="fix token_file with `edgectl config set-context`, or pass --token",
        ) from exc


def resolve_server(flag: str | None, data_dir: Path | None = None) -> str:
    """The control plane's HOST:PORT from the flag, env, config file, or `edgectl up`'s endpoints.json."""
    found = flag or os.environ.get(SERVER_ENV) or _from_config()
    if not found and (local := Endpoints.find(data_dir)) is not None:
        found = local.control_plane
    if found:
        return str(parse_host_port(found.removeprefix("grpc://"), what="control plane address"))
    raise UsageError(
        "no control plane address",
        hint=f"pass --server HOST:PORT, set {SERVER_ENV}, name one with `edgectl config set-context NAME "
        "--server HOST:PORT` (then `edgectl config use-context NAME`), or start a local fleet with `edgectl up`",
    )


@dataclass(frozen=True)
class ClientCredentials:
    """How a client proves itself: a bearer token (people, CI) and/or a client certificate (agents).

    ``ca_pem`` is the fleet CA the server's certificate must chain to; with neither a CA nor a
    token the channel is plaintext (a control plane in insecure dev mode).
    """

    token: str | None = field(default=None, repr=False)
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = field(default=None, repr=False)

    @property
    def secure(self) -> bool:
        return bool(self.ca_pem or self.token or self.client_cert_pem)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.client_key_pem,
            certificate_chain=self.client_cert_pem,
        )
        if self.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return creds


def resolve_credentials(
    token: str | None = None, ca: Path | None = None, data_dir: Path | None = None
) -> ClientCredentials:
    """Token from the flag, ``EDGECTL_TOKEN``, config.toml or the ``token_file`` `edgectl up`'s
    endpoints.json names; CA from the flag, ``EDGECTL_CA``, config.toml or endpoints.json's ``ca``."""
    found_token = token or os.environ.get(TOKEN_ENV) or _config_token()
    ca_path = str(ca) if ca else os.environ.get(CA_ENV) or _from_config("ca")
    if not found_token or not ca_path:  # `edgectl up`'s endpoints.json names its CA and admin token file
        local = Endpoints.find(data_dir)
        token_file = local.token_file if local else None
        if not found_token and token_file and Path(token_file).is_file():
            found_token = Path(token_file).read_text().strip()
        ca_path = ca_path or (local.ca if local else None)
    ca_pem = None
    if ca_path:
        try:
            ca_pem = Path(ca_path).expanduser().read_bytes()
        except OSError as exc:
            raise UsageError(
                f"cannot read the CA certificate {ca_path}: {exc}",
                hint="pass --ca with the fleet CA (ca.crt from `edgectl broker config`)",
            ) from exc
    return ClientCredentials(token=found_token.strip() if found_token else None, ca_pem=ca_pem)


MAX_PAGE = 1000  # the most a control plane returns in one page
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]


@dataclass
class ControlPlaneClient:
    """Stubs of every control-plane service over one channel (TLS when credentials say so)."""

    address: str
    timeout: float = 30.0
    credentials: ClientCredentials = field(default_factory=ClientCredentials)

    def __post_init__(self) -> None:
        if self.credentials.secure:
            self.channel = grpc.secure_channel(
                self.address, self.credentials.channel_credentials(), options=CHANNEL_OPTIONS
            )
        else:
            self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.artifacts = artifacts_pb2_grpc.ArtifactServiceStub(self.channel)
        self.fleet = fleet_pb2_grpc.FleetServiceStub(self.channel)
        self.rollouts = rollouts_pb2_grpc.RolloutServiceStub(self.channel)
        self.audit = rollouts_pb2_grpc.AuditServiceStub(self.channel)

    def call(self, method: Callable[..., T], request: Any, **kwargs: Any) -> T:
        """Call a unary method; a gRPC failure becomes a RemoteError."""
        try:
            return method(request, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def list_all(self, method: Callable[..., Any], request: Any, items: str, limit: int = 0) -> list[Any]:
        """Every item a paged List call returns, following ``next_page_token`` (up to ``limit``
        items when it is > 0); ``request`` must have a ``page`` field."""
        found: list[Any] = []
        request.page.page_size = MAX_PAGE if limit <= 0 else min(MAX_PAGE, limit)
        while True:
            response = self.call(method, request)
            found.extend(getattr(response, items))
            if not response.next_page_token or 0 < limit <= len(found):
                return found[:limit] if limit > 0 else found
            request.page.page_token = response.next_page_token

    def error(self, exc: grpc.RpcError) -> RemoteError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
        if code == grpc.StatusCode.UNAVAILABLE and not self.reachable():
            return RemoteError(
                code, f"control plane at {self.address} is unreachable ({details})",
                hint="start it with `edgectl control-plane serve` or `edgectl up`, or pass --server; "
                "a secured one needs --ca (its fleet CA) and a token",
            )  # fmt: skip
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return RemoteError(
                code, details,
                hint=f"pass --token or set {TOKEN_ENV}; an admin mints one with `edgectl control-plane token`",
            )  # fmt: skip
        return RemoteError(code, details)

    def reachable(self, timeout: float = 1.0) -> bool:
        """True when the channel connects: an UNAVAILABLE from a reachable control plane is its own
        answer (a device that did not reply), not a wrong address or CA."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PushResult:
    """What a push did: the stored artifact and how much actually travelled."""

    artifact: artifacts_pb2.Artifact
    chunks_sent: int
    bytes_sent: int
    already_present: bool


def _bundle_files(path: Path, workdir: Path, manifest: Manifest) -> Path:
    """A directory holding the bundle's files: ``path`` itself, or a .tar unpacked safely into ``workdir``.

    Only what the manifest lists is unpacked, each member checked against its listed size before
    a byte is written: an unlisted, oversized or sparse member fails the push, never the disk.
    """
    if path.is_dir():
        return path
    listed = {f.path: f.size for f in manifest.files}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in safe_members(tf, path.name):
                if member.name in (MANIFEST_NAME, SIGNATURE_NAME):
                    continue  # already read (and size-capped) by read_unverified
                if listed.get(member.name) != member.size:
                    what = "is not listed in" if member.name not in listed else "has another size than"
                    raise UsageError(
                        f"{path}: member {member.name!r} ({member.size} bytes) {what} the manifest",
                        hint="push the bundle `edgectl compress` wrote, or its directory",
                    )
                src = tf.extractfile(member)
                if src is None:
                    continue
                dest = workdir / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with src, dest.open("wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
    except (tarfile.TarError, OSError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", hint="pass an artifact directory or .tar") from exc
    return workdir


def push_artifact(
    client: ControlPlaneClient, path: Path, progress: Callable[[int, int], None] | None = None
) -> PushResult:
    """Upload a bundle (directory or .tar); resumable: only chunks the server lacks are sent.
    ``progress(bytes_sent, bytes_to_send)`` is called after each chunk."""
    manifest_bytes, signatures = read_unverified(Path(path))
    if signatures is None:
        raise UsageError(
            f"{path} is not signed", hint="sign it (edgectl compress signs by default) and push again"
        )
    plan = client.call(
        client.artifacts.PlanUpload,
        artifacts_pb2.PlanUploadRequest(manifest=manifest_bytes, signatures=signatures),
    )
    if plan.already_complete:
        art = client.call(client.artifacts.Get, artifacts_pb2.GetArtifactRequest(artifact=plan.digest))
        return PushResult(art, 0, 0, True)
    manifest = Manifest.from_bytes(manifest_bytes)
    where = chunk_locations(manifest)
    with tempfile.TemporaryDirectory(prefix="edgectl-push-") as tmp:
        root = _bundle_files(Path(path), Path(tmp), manifest)

        to_send = sum(where[d][0].size for d in plan.missing_chunks)

        def requests() -> Iterator[artifacts_pb2.UploadRequest]:
            yield artifacts_pb2.UploadRequest(header=artifacts_pb2.UploadHeader(digest=plan.digest))
            sent = 0
            for digest in plan.missing_chunks:
                chunk, entry = where[digest]
                with (root / entry.path).open("rb") as fh:
                    fh.seek(chunk.offset)
                    data = fh.read(chunk.size)
                yield artifacts_pb2.UploadRequest(chunk=artifacts_pb2.ChunkPayload(digest=digest, data=data))
                sent += len(data)
                if progress is not None:
                    progress(sent, to_send)

        response = client.call(client.artifacts.Upload, requests(), timeout=600)
    return PushResult(response.artifact, int(response.chunks_received), int(response.bytes_received), False)
