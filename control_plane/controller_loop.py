"""The leader's controller thread: steps every active rollout when woken (a report arrived, an
operator acted) or on each tick; a failed step changed nothing and is retried on the next."""

from __future__ import annotations

import logging
import threading

from edgectl.control_plane.controller import RolloutController

log = logging.getLogger(__name__)


class ControllerLoop:
    """Runs ``step_all`` whenever woken (a report arrived, an operator acted) or every ``interval``."""

    def __init__(self, controller: RolloutController, interval: float = 0.25) -> None:
        self.controller = controller
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.controller.step_all()
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
