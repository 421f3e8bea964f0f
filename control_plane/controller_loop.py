"""The leader's controller thread: steps every active rollout when woken (a report arrived, an
operator acted) or on each tick; a failed step changed nothing and is retried on the next."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from edgectl.control_plane.controller import RolloutController
from edgectl.logs import name_os_thread

log = logging.getLogger(__name__)


class ControllerLoop:
    """Runs ``step_all`` whenever woken (a report arrived, an operator acted) or every ``interval``,
    at most once per ``min_gap`` seconds: reports come in bursts, and one step judges a whole burst."""

    def __init__(self, controller: RolloutController, interval: float = 0.25, min_gap: float = 0.25) -> None:
        self.controller = controller
        self.interval = interval
        self.min_gap = min(min_gap, interval)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reported: set[str] | None = None  # devices reported since the last step; None: anything
        self._thread: threading.Thread | None = None

    def wake(self, reported: Iterable[str] | None = None) -> None:
        """Step soon. ``reported``: the devices whose reports arrived; None: anything may have changed."""
        with self._lock:
            if reported is None:
                self._reported = None
            elif self._reported is not None:
                self._reported.update(reported)
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        with self._lock:
            self._reported = None  # a new leader judges every device first
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_os_thread()
        last = float("-inf")
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._stop.wait(max(0.0, last + self.min_gap - time.monotonic())):
                break
            self._wake.clear()
            with self._lock:
                reported, self._reported = self._reported, set()
            last = time.monotonic()
            try:
                self.controller.step_all(reported)
            except Exception:
                # A failed step changed nothing (its transaction rolled back); retry on the next tick.
                log.exception("rollout controller step failed; retrying")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
