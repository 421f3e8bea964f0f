"""Secrets out of text that leaves a process: log lines sent for remote diagnostics, support output.

The agent redacts each line as its ring captures it; the control plane redacts again what it
relays, so an older or misbehaving agent still cannot hand a secret to an operator.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"
_SECRETS = [
    re.compile(r"edgectl\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # bearer tokens
    re.compile(r"(?i)(bearer\s+)\S+"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)"),
    # key=value, key: value and "key": "value" for the names secrets go by
    re.compile(
        r"""(?i)((?:password|passwd|secret|token|api[_-]?key|enroll[_-]?token|credentials?)["']?\s*[:=]\s*["']?)[^\s"',}]+"""
    ),
    re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"),  # scheme://user:password@host
]
# Settings whose name says they hold a secret are dropped whole, whatever their value looks like.
_SECRET_NAME = re.compile(r"(?i)token|passw|secret|key|credential")


def redact(text: str) -> str:
    """``text`` with anything that looks like a secret replaced by ``[redacted]``."""
    text = _SECRETS[0].sub(REDACTED, text)
    text = _SECRETS[1].sub(lambda m: m.group(1) + REDACTED, text)
    text = _SECRETS[2].sub(REDACTED, text)
    text = _SECRETS[3].sub(lambda m: m.group(1) + REDACTED, text)
    return _SECRETS[4].sub(lambda m: m.group(1) + REDACTED + "@", text)


def redact_settings(value: Any) -> Any:
    """A JSON-ready copy of ``value`` without any field that names a token, password, key or credential,
    and with :func:`redact` over every string left (support bundles: an agent's config)."""
    if isinstance(value, dict):
        return {str(k): redact_settings(v) for k, v in value.items() if not _SECRET_NAME.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [redact_settings(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))  # paths and the like
