"""The control plane's named failures; the gRPC layer maps each class to one status code.

Domain code raises these with a message that says what to fix; ``rpc.status_for``
is the one place that turns them into gRPC status codes.
"""

from __future__ import annotations

from edgectl.errors import EdgectlError


class ControlPlaneError(EdgectlError):
    """Root of every control-plane failure."""


class InvalidArgument(ControlPlaneError):
    """The request is malformed: bad selector, strategy, digest, or bytes that do not match."""

    exit_code = 2


class NotFound(ControlPlaneError):
    """An artifact, device, rollout or upload plan that the store does not hold."""


class FailedPrecondition(ControlPlaneError):
    """The request is well-formed but the system is not in a state that allows it."""


class PermissionDenied(ControlPlaneError):
    """A signature by an untrusted key, or a used/expired enrollment token."""


class StateStoreError(ControlPlaneError):
    """The state database cannot be opened, migrated or reached."""


class StateUrlError(StateStoreError):
    """A state URL that names no store (``--state mysql://...``): the user's input to fix."""

    exit_code = 2


class Unavailable(ControlPlaneError):
    """A service the control plane depends on (the broker's admin API) does not answer; retry later."""
