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


class SecurityUsageError(SecurityError):
    """A name or file given to a security command that cannot work as given (bad input)."""

    exit_code = 2


class BrokerUnreachableError(SecurityError):
    """A broker edgectl must talk to could not be reached or did not answer in time (try again later)."""

    exit_code = 9  # as for an unreachable control plane (docs/cli.md's table)


class BrokerLoginRefusedError(SecurityError):
    """A broker refused the login edgectl was given (the wrong credentials file)."""

    exit_code = 8  # not allowed (docs/cli.md's table)
