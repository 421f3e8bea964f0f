"""Secrets out of text that leaves a process: log lines sent for remote diagnostics, support output.

The agent redacts each line as its ring captures it; the control plane redacts again what it
relays, so an older or misbehaving agent still cannot hand a secret to an operator.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
_SECRETS = [
    re.compile(r"edgectl\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # bearer tokens
    re.compile(r"(?i)(bearer\s+)\S+"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)"),
    # key=value, key: value and "key": "value" for the names secrets go by
    re.compile(
        r"""(?i)((?:password|passwd|secret|token|api[_-]?key|enroll[_-]?token|credentials?)["']?\s*[:=]\s*["']?)[^\s"',}]+"""
    ),
]


def redact(text: str) -> str:
    """``text`` with anything that looks like a secret replaced by ``[redacted]``."""
    text = _SECRETS[0].sub(REDACTED, text)
    text = _SECRETS[1].sub(lambda m: m.group(1) + REDACTED, text)
    text = _SECRETS[2].sub(REDACTED, text)
    return _SECRETS[3].sub(lambda m: m.group(1) + REDACTED, text)
