"""TLS and credentials on the data path: the inference listeners (gRPC and HTTP) and the burst
client. Certificates come from files or the device's enrollment (fleet CA); a bearer token and
private keys are read from files only their owner can read (0600), never from argv.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from edgectl.agent.errors import ConfigError
from edgectl.security.files import check_private, write_private, write_public

HEALTH_PREFIXES = ("/grpc.health.v1.Health/", "/v2/health/")


def read_secret(path: Path, what: str) -> bytes:
    """A secret file's bytes; ConfigError when it is missing or readable by group or others."""
    try:
        check_private(path, what, error=ConfigError)
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def read_token(path: Path) -> str:
    """A bearer token from a 0600 file (surrounding whitespace dropped)."""
    token = read_secret(path, "token file").decode().strip()
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


@dataclass(frozen=True)
class ServingSecurity:
    """What the inference listeners present and require: a certificate (TLS), client
    certificates from a CA (mTLS) and/or a bearer token. Health checks stay open."""

    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    client_ca_pem: bytes | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.cert_pem is not None

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials for the gRPC port, or None for plaintext."""
        if self.cert_pem is None or self.key_pem is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.client_ca_pem,
            require_client_auth=self.client_ca_pem is not None,
        )

    def ssl_context(self, workdir: Path) -> ssl.SSLContext | None:
        """An SSLContext for the HTTP port, or None for plaintext (``workdir`` holds the PEMs
        while ssl loads them: it reads files only)."""
        if self.cert_pem is None or self.key_pem is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert, key = workdir / "serving.crt", workdir / "serving.key"
        write_public(cert, self.cert_pem)
        write_private(key, self.key_pem)
        try:
            ctx.load_cert_chain(cert, key)
        finally:
            key.unlink()
        if self.client_ca_pem is not None:
            ctx.load_verify_locations(cadata=self.client_ca_pem.decode())
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _token_ok(self, header: str | None) -> bool:
        assert self.token is not None
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.token}".encode())

    def grpc_interceptors(self) -> list[grpc.ServerInterceptor]:
        """The bearer-token check for the gRPC port (none without a token)."""
        return [_TokenInterceptor(self._token_ok)] if self.token else []

    def http_middlewares(self) -> tuple[Any, ...]:
        """The bearer-token check for the HTTP port (none without a token)."""
        if not self.token:
            return ()

        @web.middleware
        async def bearer(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path.startswith(HEALTH_PREFIXES) or self._token_ok(
                request.headers.get("Authorization")
            ):
                return await handler(request)
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )

        return (bearer,)


class _TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, check: Callable[[str | None], bool]) -> None:
        self._check = check

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        # A streaming call is refused when it opens: a unary refusal would first wait for a
        # request, holding a server worker for a caller without the token.
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(HEALTH_PREFIXES):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        handler = continuation(details)
        if self._check(metadata.get("authorization")):
            return handler
        return self._deny_stream if handler is not None and handler.request_streaming else self._deny


def serving_security(
    *,
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None,
    token_file: Path | None,
    fleet: tuple[bytes, bytes] | None = None,
) -> ServingSecurity | None:
    """The listeners' security from files, or the enrollment's certificate (``fleet``: cert and
    key PEMs, issued by the fleet CA); None when nothing is asked for."""
    token = read_token(token_file) if token_file is not None else None
    cert_pem = key_pem = None
    if cert is not None and key is not None:
        cert_pem, key_pem = _read(cert, "certificate"), read_secret(key, "private key")
    elif fleet is not None:
        cert_pem, key_pem = fleet
    ca_pem = _read(client_ca, "client CA") if client_ca is not None else None
    if cert_pem is None and ca_pem is not None:
        raise ConfigError(
            "client certificates (mTLS) need TLS", hint="add --tls-cert/--tls-key or --tls-fleet"
        )
    if cert_pem is None and token is None:
        return None
    return ServingSecurity(cert_pem, key_pem, ca_pem, token)


def burst_credentials(
    *, ca: Path | None, token_file: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    """Channel credentials for the burst endpoint: TLS trusting ``ca`` (the system's roots when
    only a client certificate is given), a client certificate, a bearer token; None: plaintext."""
    if ca is None and cert is None:
        if token_file is not None:
            raise ConfigError("a burst token is only sent over TLS", hint="add --burst-ca CA.pem")
        return None
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "burst CA") if ca is not None else None,
        private_key=read_secret(key, "burst client key") if key is not None else None,
        certificate_chain=_read(cert, "burst client certificate") if cert is not None else None,
    )
    if token_file is not None:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(read_token(token_file))
        )
    return creds
