"""What the leader's ingest last stored of each device's report, so that a report that changes
nothing (a heartbeat: only its timestamp is new) costs no decode, no transaction and no
controller step. Its last-seen time is kept here and written for many devices at once, at most
``LAST_SEEN_FLUSH_S`` later.

A crash loses only those last-seen advances (a device looks up to that much less recently seen,
until its next report); every report that changes the row is committed before the controller
is woken, as before. The flush writes a device's last-seen time only while its row still holds
what this leader stored (see :meth:`Fleet.touch`); a row changed by someone else (re-enrolled,
decommissioned, another leader) is reported back, forgotten here, and written in full again.
What it holds: the decoded report and its row per device, a few KB (1.4 KB of Python objects for
a one-model report, plus the message), so some 300 MB for 100,000 devices.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgectl.control_plane.device_state import Reported, ReportRow

LAST_SEEN_FLUSH_S = 10.0
TIMESTAMP_FIELD = "reportedAt"  # proto3 JSON name of ReportedState.reported_at: new in every report


def report_key(obj: dict[str, Any]) -> bytes:
    """A digest of a report's JSON object without its timestamp: equal keys, equal reports."""
    rest = {k: v for k, v in obj.items() if k != TIMESTAMP_FIELD}
    return hashlib.blake2b(json.dumps(rest, sort_keys=True).encode(), digest_size=16).digest()


@dataclass(frozen=True)
class StoredReport:
    """One device's last stored report: its key, and the observation as decoded and written."""

    key: bytes
    observation: Reported


class StoredReports:
    """The last report stored per device, and the last-seen times not yet written."""

    def __init__(
        self, flush_s: float = LAST_SEEN_FLUSH_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.flush_s = flush_s
        self._clock = clock
        self._lock = threading.Lock()  # the ingest thread, and stop() from another
        self._stored: dict[str, StoredReport] = {}
        self._seen: dict[str, float] = {}
        self._flushed_at = clock()

    def same(self, device_id: str, key: bytes) -> StoredReport | None:
        """The stored report when ``key`` says the new one is the same but for its timestamp."""
        with self._lock:
            stored = self._stored.get(device_id)
        return stored if stored is not None and stored.key == key else None

    def stored(self, key: bytes, observation: Reported) -> None:
        """``observation`` is committed: the device's row holds it (and its last-seen time)."""
        with self._lock:
            self._stored[observation.device_id] = StoredReport(key, observation)
            self._seen.pop(observation.device_id, None)

    def seen(self, device_id: str, at: float) -> None:
        """An unchanged report arrived at ``at`` (wall clock): write its time with the next flush."""
        with self._lock:
            self._seen[device_id] = max(at, self._seen.get(device_id, at))

    def due(self) -> bool:
        return bool(self._seen) and self._clock() - self._flushed_at >= self.flush_s

    def take_seen(self) -> dict[str, tuple[float, ReportRow]]:
        """The pending last-seen times with the row each device's was stored with; pending no more."""
        with self._lock:
            seen, self._seen = self._seen, {}
            self._flushed_at = self._clock()
            return {d: (at, self._stored[d].observation.row) for d, at in seen.items() if d in self._stored}

    def forget(self, device_id: str) -> StoredReport | None:
        """Drop what is known of the device (its row changed elsewhere); returns what was stored."""
        with self._lock:
            self._seen.pop(device_id, None)
            return self._stored.pop(device_id, None)

    def clear(self) -> None:
        """Forget every device: a new term as leader starts from what the store holds."""
        with self._lock:
            self._stored.clear()
            self._seen.clear()
