"""Structured logs: plain text for people, or one JSON object per line for collectors.

Shared by the control plane and the agent (both take ``--log-format text|json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        base = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        text = f"{base} {extra}" if extra else base
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was at set-up: a
    process that swaps its stderr (a test's CLI runner, a supervisor) never logs into a closed file."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Send this process's logs to stderr in ``text`` or ``json``."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def name_os_thread(name: str = "") -> None:
    """Give the calling thread's OS name its Python name (at most 15 bytes on Linux), so that
    ``top -H`` and /proc/PID/task/*/comm tell a process's threads apart; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # only here: a process that never names a thread never loads it

    label = (name or threading.current_thread().name).encode()[:15]
    with contextlib.suppress(OSError, AttributeError):  # a libc without prctl: the names stay
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(label), 0, 0, 0)  # PR_SET_NAME
