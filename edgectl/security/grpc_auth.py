"""One gRPC server interceptor that authenticates and authorizes every call.

Identity comes from a bearer token (people, CI) or from a client certificate signed by the
fleet CA (agents, mTLS). Each method needs a role (:data:`DEFAULT_POLICY`); unknown methods need
admin, so a new RPC is closed until someone opens it. The identity of the call in progress is
available to servicers through :func:`current_identity`, for the audit log.

gRPC's Python API cannot ask for a client certificate without requiring one, so a control
plane listens twice (see :mod:`edgectl.security.grpc_tls`): TLS + tokens for people and CI,
mTLS for agents. The interceptor serves both.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from edgectl.security.errors import TokenError
from edgectl.security.tokens import Claims, Role, TokenVerifier

PUBLIC = None
V1 = "/edgectl.v1."
DEFAULT_POLICY: dict[str, Role | None] = {
    f"{V1}FleetService/Enroll": PUBLIC,  # the one-time token is the credential
    f"{V1}ArtifactService/Get": Role.DEVICE,
    f"{V1}ArtifactService/Download": Role.DEVICE,
    f"{V1}ArtifactService/GetChunkUrls": Role.DEVICE,
    f"{V1}ArtifactService/List": Role.VIEWER,
    f"{V1}ArtifactService/PlanUpload": Role.DEPLOYER,
    f"{V1}ArtifactService/Upload": Role.DEPLOYER,
    f"{V1}ArtifactService/Delete": Role.ADMIN,
    f"{V1}FleetService/ListDevices": Role.VIEWER,
    f"{V1}FleetService/GetDevice": Role.VIEWER,
    f"{V1}FleetService/GetBurstBudget": Role.VIEWER,
    f"{V1}FleetService/LabelDevice": Role.DEPLOYER,
    f"{V1}FleetService/CreateEnrollmentToken": Role.ADMIN,
    f"{V1}FleetService/DecommissionDevice": Role.ADMIN,
    f"{V1}FleetService/DeviceLogs": Role.ADMIN,  # logs can say more than the inventory does
    f"{V1}RolloutService/Get": Role.VIEWER,
    f"{V1}RolloutService/List": Role.VIEWER,
    f"{V1}RolloutService/Watch": Role.VIEWER,
    f"{V1}RolloutService/Create": Role.DEPLOYER,
    f"{V1}RolloutService/Pause": Role.DEPLOYER,
    f"{V1}RolloutService/Resume": Role.DEPLOYER,
    f"{V1}RolloutService/Abort": Role.DEPLOYER,
    f"{V1}RolloutService/Rollback": Role.DEPLOYER,
    f"{V1}AuditService/List": Role.ADMIN,
}
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token's subject or a certificate's CN, with its role and how it proved it."""

    subject: str
    role: Role
    via: str  # "token", "mtls", "none" (auth disabled) or "anonymous" (public method)
    peer: str


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("edgectl_identity", default=None)


def current_identity() -> Identity | None:
    """The identity of the gRPC call this thread is serving, if any."""
    return _current.get()


def required_role(method: str, policy: dict[str, Role | None] = DEFAULT_POLICY) -> Role | None:
    """The role ``method`` needs (None: public); admin for anything the policy does not name."""
    if method.startswith(PUBLIC_PREFIXES):
        return PUBLIC
    return policy.get(method, Role.ADMIN)


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates each call, checks its role, and exposes the identity to the servicer.

    ``verifier=None`` turns authentication off (a single-box dev fleet): every caller is an
    anonymous admin, and the audit log says so. ``certificate_current(cn, pem)``, when given,
    is asked about every client certificate the TLS layer accepted, so that a decommissioned
    or re-enrolled device's certificate stops working before it expires; ``token_revoked(claims)``,
    when given, about every bearer token whose signature and expiry passed.
    """

    def __init__(
        self,
        verifier: TokenVerifier | None,
        policy: dict[str, Role | None] = DEFAULT_POLICY,
        certificate_current: Callable[[str, bytes], bool] | None = None,
        token_revoked: Callable[[Claims], bool] | None = None,
        on_denied: Callable[[Identity | None, str, grpc.StatusCode, str], None] | None = None,
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._certificate_current = certificate_current
        self._token_revoked = token_revoked
        # Told of every refusal (identity or None, method, code, message): metrics, audit log.
        self._on_denied = on_denied

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        needed = required_role(method, self._policy)

        def authorize(context: grpc.ServicerContext) -> None:
            identity = self._authenticate(metadata, context, method)
            if needed is not PUBLIC:
                if identity is None:
                    self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                                 f"{method} needs a bearer token (authorization: Bearer ...) or a client certificate")  # fmt: skip
                elif identity.role < needed:
                    self._refuse(context, method, grpc.StatusCode.PERMISSION_DENIED,
                                 f"{identity.subject} ({identity.role.name.lower()}) may not call {method}: "
                                 f"it needs the {needed.name.lower()} role", identity)  # fmt: skip
            _current.set(identity)

        return _wrap(handler, authorize)

    def _refuse(
        self,
        context: grpc.ServicerContext,
        method: str,
        code: grpc.StatusCode,
        message: str,
        identity: Identity | None = None,
    ) -> None:
        if self._on_denied is not None:
            self._on_denied(identity, method, code, message)
        context.abort(code, message)

    def _authenticate(
        self, metadata: dict[str, str], context: grpc.ServicerContext, method: str
    ) -> Identity | None:
        peer = context.peer()
        if self._verifier is None:
            return Identity("anonymous", Role.ADMIN, "none", peer)
        header = metadata.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                             "authorization metadata must be 'Bearer <token>'")  # fmt: skip
            try:
                claims = self._verifier.verify(token.strip())
            except TokenError as exc:
                self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED, str(exc))
            if self._token_revoked is not None and self._token_revoked(claims):
                self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                             f"token {claims.token_id} of {claims.subject} was revoked; ask an admin for a new one")  # fmt: skip
            return Identity(claims.subject, claims.role, "token", peer)
        auth = context.auth_context()
        common_names = auth.get("x509_common_name")
        if common_names:  # the TLS layer already checked the chain against the fleet CA
            subject = common_names[0].decode()
            pems = auth.get("x509_pem_cert") or [b""]
            if self._certificate_current is not None and not self._certificate_current(subject, pems[0]):
                self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                             f"the client certificate of {subject} was revoked (device decommissioned or re-enrolled)")  # fmt: skip
            return Identity(subject, Role.DEVICE, "mtls", peer)
        return None


def _wrap(handler: Any, authorize: Callable[[grpc.ServicerContext], None]) -> Any:
    """The same handler, with ``authorize`` run first in the serving thread."""

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            authorize(context)
            return behavior(request, context)

        return call

    def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            authorize(context)
            yield from behavior(request, context)

        return call

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}  # fmt: skip
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
