"""Errors raised by ``edgectl.devices``: bad or unknown device profiles."""

from __future__ import annotations

from edgectl.errors import EdgectlError, UsageError


class DeviceError(EdgectlError):
    """Root of the errors this package raises on purpose."""


class ProfileError(DeviceError, UsageError):
    """A device profile is unknown, unreadable or does not follow the schema.

    It is a :class:`UsageError` too: a profile is named or written by the user.
    """
