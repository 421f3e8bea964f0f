"""The agent's recent log lines, kept in a bounded ring for remote diagnostics (`edgectl devices logs`).

A logging handler on the root logger copies every record into the ring with secrets redacted at
capture time, so neither the ring nor an answer can hold a token, a password or a private key.
The ring is bounded by lines and by bytes; an answer (:meth:`LogRing.answer`) is bounded again,
keeping the newest lines.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

from edgectl.protos.v1 import fleet_pb2, mqtt_pb2
from edgectl.redact import redact

MAX_LINES = 2000
MAX_BYTES = 512 * 1024
MAX_LINE_CHARS = 2000  # one line; a longer message (a traceback) is cut
ANSWER_MAX_LINES = 1000
ANSWER_MAX_BYTES = 128 * 1024  # well under the broker's message size limit


@dataclass(frozen=True)
class Line:
    """One kept line."""

    at: float
    level: str
    logger: str
    text: str

    @property
    def size(self) -> int:
        return len(self.text) + len(self.logger) + len(self.level) + 16


class LogRing(logging.Handler):
    """A logging handler that keeps the newest lines, bounded by count and bytes."""

    def __init__(self, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> None:
        super().__init__(logging.DEBUG)
        self.max_bytes = max_bytes
        self._lines: collections.deque[Line] = collections.deque(maxlen=max_lines)
        self._bytes = 0
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            line = Line(record.created, record.levelname.lower(), record.name, redact(text)[:MAX_LINE_CHARS])
        except Exception:  # a bad log call must not break the caller
            return
        with self._ring_lock:
            if len(self._lines) == self._lines.maxlen:
                self._bytes -= self._lines[0].size
            self._lines.append(line)
            self._bytes += line.size
            while self._bytes > self.max_bytes and self._lines:
                self._bytes -= self._lines.popleft().size

    def lines(self) -> list[Line]:
        """Every kept line, oldest first."""
        with self._ring_lock:
            return list(self._lines)

    def answer(self, request: mqtt_pb2.LogRequest, device_id: str) -> mqtt_pb2.LogResponse:
        """The newest lines at or after ``request.since_unix``, within the request's and our own bounds."""
        max_lines = min(request.max_lines or ANSWER_MAX_LINES, ANSWER_MAX_LINES)
        max_bytes = min(request.max_bytes or ANSWER_MAX_BYTES, ANSWER_MAX_BYTES)
        matching = [ln for ln in self.lines() if ln.at >= request.since_unix]
        chosen: list[Line] = []
        used = 0
        for ln in reversed(matching):
            if len(chosen) >= max_lines or used + ln.size > max_bytes:
                break
            chosen.append(ln)
            used += ln.size
        chosen.reverse()
        return mqtt_pb2.LogResponse(
            request_id=request.request_id, device_id=device_id, truncated=len(chosen) < len(matching),
            lines=[fleet_pb2.LogLine(at=ln.at, level=ln.level, logger=ln.logger, text=ln.text) for ln in chosen],
        )  # fmt: skip


_process_ring: LogRing | None = None
_process_lock = threading.Lock()


def process_ring() -> LogRing:
    """This process's ring, attached to the root logger on first use.

    One per process, not per agent: a simulator runs a hundred agents in one process, and a ring
    each would copy every line a hundred times (and keep 512 KiB each). With one agent per process,
    as on a device, it is that agent's log.
    """
    global _process_ring
    with _process_lock:
        if _process_ring is None:
            _process_ring = LogRing()
        root = logging.getLogger()
        if _process_ring not in root.handlers:  # also after a logging set-up replaced the handlers
            root.addHandler(_process_ring)
        return _process_ring
