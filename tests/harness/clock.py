"""A wall clock the test moves: handed to an agent or a control plane for maintenance windows."""

from __future__ import annotations

import threading


class FakeClock:
    """A ``time.time`` stand-in, set or advanced by the test; safe to read from other threads."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def set(self, now: float) -> None:
        with self._lock:
            self.now = now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
