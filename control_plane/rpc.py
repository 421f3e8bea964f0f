"""The per-call machinery every servicer method goes through.

:func:`rpc` maps domain errors to gRPC status codes (:func:`status_for`, the one place that
mapping lives), counts failures, and writes the audit entry of each mutating call, success or
not; :func:`caller` names who is calling; :func:`page` reads list paging.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from edgectl.artifact import ArtifactError, BlobStoreError
from edgectl.control_plane.audit import ANONYMOUS, SECRET_FIELDS, AuditLog
from edgectl.control_plane.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StateStoreError,
    Unavailable,
)
from edgectl.control_plane.limits import LimitExceeded, StreamLimiter
from edgectl.errors import EdgectlError
from edgectl.labels import LabelError
from edgectl.protos.v1 import common_pb2
from edgectl.security.grpc_auth import current_identity

log = logging.getLogger(__name__)
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StateStoreError, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (BlobStoreError, grpc.StatusCode.UNAVAILABLE),
    (ArtifactError, grpc.StatusCode.INVALID_ARGUMENT),
    (LabelError, grpc.StatusCode.INVALID_ARGUMENT),
    (EdgectlError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised by domain code."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("unexpected error in a gRPC method", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in the control plane; its log has the details"


@dataclass
class Note:
    """What a method tells the audit log about itself (defaults come from the request)."""

    target: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def caller() -> str:
    """Who the audit log and ``created_by`` name for the call in progress.

    A token's subject; ``device:<id>`` for an mTLS agent; ``anonymous`` with auth off or for
    a public method (Enroll, whose target names the device).
    """
    who = current_identity()
    if who is None or who.via in ("none", "anonymous"):
        return ANONYMOUS
    return f"device:{who.subject}" if who.via == "mtls" else who.subject


def summary(request: Any) -> dict[str, Any]:
    """The request as JSON with secrets and bulk bytes removed."""
    if not isinstance(request, Message):
        return {}
    data = json_format.MessageToDict(request, preserving_proto_field_name=True)
    return {k: v for k, v in data.items() if k not in SECRET_FIELDS}


def stream_owner(context: grpc.ServicerContext) -> tuple[str, bool]:
    """Whose stream cap a streaming call counts against, and whether it counts in the shared total.

    People (tokens) share the listener's total; a device (mTLS) or an unauthenticated dev-mode
    caller (keyed by its connection) counts only against its own cap.
    """
    who = current_identity()
    if who is None or who.via in ("none", "anonymous"):
        return f"peer:{context.peer()}", False
    return caller(), who.via == "token"


class Hooks:
    """What ``rpc`` needs from the server: the audit log, the error counter and the stream caps."""

    def __init__(
        self, audit: AuditLog, count_error: Callable[[str, str], None], streams: StreamLimiter | None = None
    ) -> None:
        self.audit = audit
        self.count_error = count_error
        self.streams = streams


def rpc(
    action: str, mutating: bool = False, target: str = "", streaming: bool = False
) -> Callable[[Callable[..., Any]], Any]:
    """Wrap a servicer method: map errors, count them, audit mutating calls."""
    method = f"/edgectl.v1.{action}"

    def decorate(fn: Callable[..., Any]) -> Any:
        def finish(
            self: Servicer, request: Any, context: grpc.ServicerContext, note: Note, code: str
        ) -> None:
            if mutating:
                details = note.details or summary(request)
                who = note.target or str(details.get(target, "")) if target else note.target
                self.hooks.audit.record(caller(), context.peer(), method, who, json.dumps(details), code)

        def fail(
            self: Servicer, request: Any, context: grpc.ServicerContext, note: Note, exc: Exception
        ) -> None:
            code, message = status_for(exc)
            self.hooks.count_error(method, code.name)
            finish(self, request, context, note, code.name)
            context.abort(code, message)

        if streaming:

            @functools.wraps(fn)
            def stream(self: Servicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                note = Note()
                owner, shared = stream_owner(context)
                streams = self.hooks.streams
                try:
                    if streams is not None:  # before any work: a stream holds a worker thread
                        streams.acquire(owner, method, shared)
                except LimitExceeded as exc:
                    fail(self, request, context, note, exc)
                try:
                    yield from fn(self, request, context, note)
                except Exception as exc:
                    fail(self, request, context, note, exc)
                finally:
                    if streams is not None:
                        streams.release(owner, shared)

            return stream

        @functools.wraps(fn)
        def unary(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            note = Note()
            try:
                response = fn(self, request, context, note)
            except Exception as exc:
                fail(self, request, context, note, exc)
                raise  # unreachable: abort raises
            finish(self, request, context, note, "OK")
            return response

        return unary

    return decorate


def page(p: common_pb2.Page, default: int = 100) -> tuple[int, int]:
    """(offset, limit) from a Page; the token is the offset the previous page ended at."""
    try:
        offset = int(p.page_token) if p.page_token else 0
    except ValueError as exc:
        raise InvalidArgument(f"page token {p.page_token!r} is not one this server issued") from exc
    if offset < 0 or p.page_size < 0:
        raise InvalidArgument("page size and token must not be negative")
    return offset, min(p.page_size or default, 1000)


def next_token(offset: int, limit: int, got: int) -> str:
    return str(offset + got) if got == limit else ""


class Servicer:
    """Base for the servicers: holds the hooks ``rpc`` uses."""

    hooks: Hooks
