"""Security errors: each names what was refused and what to do about it."""

from __future__ import annotations

from edgectl.errors import EdgectlError


class SecurityError(EdgectlError):
    """A credential, certificate or token was refused or could not be made."""


class TokenError(SecurityError):
    """A bearer token is missing, malformed, forged or expired."""


class PermissionDenied(SecurityError):
    """A valid identity asked for something its role does not allow."""


class BrokerAdminError(SecurityError):
    """The broker's dynamic-security API refused or did not answer a command."""
