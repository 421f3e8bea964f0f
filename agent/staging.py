"""Swaps that wait for a maintenance window: per serving name, the artifact fetched, verified and
installed on disk but not serving yet, and when to look again.

The reconcile loop stages as soon as an order arrives (downloads may run any time) and asks here
whether it may swap now; the window is the signed order's (``edgectl.window``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from edgectl.agent.errors import RefusedError
from edgectl.agent.state import Installed
from edgectl.protos.v1 import mqtt_pb2 as mpb
from edgectl.window import MaintenanceWindow, WindowError

# Look again at least this often while waiting, so a clock that jumps (NTP, a test's clock) is noticed.
WINDOW_POLL_S = 30.0


@dataclass(frozen=True)
class Staged:
    """A verified artifact on disk and the execution providers that fit it."""

    installed: Installed
    providers: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    """The swap waits: look again after ``delay_s``; ``message`` is set when the wait is new."""

    delay_s: float
    message: str


class SwapWindows:
    """What is staged per serving name, and whether its swap must wait for its window."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._staged: dict[str, Staged] = {}
        self._waiting: dict[str, str] = {}  # name -> digest staged and waiting for its window

    @staticmethod
    def window(dm: mpb.DesiredModel) -> MaintenanceWindow | None:
        """The model's window (None: swap at once); RefusedError when this device cannot read it."""
        if not dm.window:
            return None
        try:
            return MaintenanceWindow.parse(dm.window)
        except WindowError as exc:
            # e.g. a time zone this device's tzdata lacks: never swap at a time nobody chose.
            raise RefusedError(f"cannot honour the maintenance window: {exc}") from exc

    def staged(self, dm: mpb.DesiredModel) -> Staged | None:
        found = self._staged.get(dm.name)
        return found if found is not None and found.installed.digest == dm.digest else None

    def put(self, name: str, staged: Staged) -> Staged:
        self._staged[name] = staged
        return staged

    def wait(self, dm: mpb.DesiredModel, window: MaintenanceWindow | None) -> Wait | None:
        """None when the swap may happen now; else how long to wait before looking again."""
        now = self.clock()
        if window is None or window.contains(now):
            return None
        opens = window.next_open(now)
        message = ""
        if self._waiting.get(dm.name) != dm.digest:
            self._waiting[dm.name] = dm.digest
            when = datetime.fromtimestamp(opens, timezone.utc).isoformat(timespec="seconds")
            message = f"staged {dm.name} version {dm.version}; swapping in the window {window} (opens {when})"
        return Wait(min(max(opens - now, 0.0), WINDOW_POLL_S), message)

    def forget(self, name: str) -> None:
        """Swapped in, refused, or no longer desired."""
        self._staged.pop(name, None)
        self._waiting.pop(name, None)

    def names(self) -> list[str]:
        return sorted(set(self._staged) | set(self._waiting))

    def waiting_digest(self, name: str) -> str:
        """The digest staged for ``name`` that waits for its window, for the reported state."""
        return self._waiting.get(name, "")

    def keep(self) -> list[Installed]:
        """Staged artifacts, which garbage collection must leave on disk."""
        return [s.installed for s in self._staged.values()]
