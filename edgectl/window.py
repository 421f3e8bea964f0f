"""Maintenance windows (``"Mon-Fri 01:00-04:00 Europe/Berlin"``): when a device may swap models.

The one parser and clock arithmetic the CLI, the control plane (wave deadlines) and the agent
(when to activate a staged model) share. Time zones come from the standard library's zoneinfo.
A window that crosses midnight (``22:00-02:00``) belongs to the day it opens on.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edgectl.errors import UsageError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HINT = 'write [DAYS] HH:MM-HH:MM [ZONE], e.g. "Mon-Fri 01:00-04:00 Europe/Berlin" or "daily 02:00-03:00"'
_TIMES_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


class WindowError(UsageError):
    """A maintenance window that cannot be understood as written."""


def _days(text: str) -> frozenset[int]:
    if text.lower() in ("daily", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.lower().split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(e[:3] not in DAYS or len(e) < 3 for e in ends):
            raise WindowError(f"maintenance window days {text!r} are not understood", hint=_HINT)
        first, last = DAYS.index(ends[0][:3]), DAYS.index(ends[-1][:3])
        # Fri-Mon wraps over the weekend.
        out.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(out)


@dataclass(frozen=True)
class MaintenanceWindow:
    """Days of the week (0 = Monday) and a daily [start, end) in minutes, in one time zone."""

    days: frozenset[int]
    start_min: int
    end_min: int
    zone: str
    text: str

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        """``[DAYS] HH:MM-HH:MM [ZONE]``; days default to every day, the zone to UTC."""
        parts = text.split()
        times = [i for i, p in enumerate(parts) if _TIMES_RE.fullmatch(p)]
        if len(times) != 1 or times[0] > 1 or len(parts) > 3:
            raise WindowError(f"maintenance window {text!r} is not understood", hint=_HINT)
        at = times[0]
        days = _days(parts[0]) if at == 1 else frozenset(range(7))
        zone = parts[at + 1] if len(parts) > at + 1 else "UTC"
        m = _TIMES_RE.fullmatch(parts[at])
        assert m is not None
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise WindowError(f"maintenance window {text!r} has a time that does not exist", hint=_HINT)
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise WindowError(f"maintenance window {text!r} is empty: it opens when it closes", hint=_HINT)
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise WindowError(
                f"maintenance window time zone {zone!r} is unknown",
                hint="use an IANA name such as Europe/Berlin or UTC (install tzdata if the system lacks it)",
            ) from exc
        return cls(days, start, end, zone, " ".join(parts))

    def _local(self, t: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(t, ZoneInfo(self.zone))

    def contains(self, t: float) -> bool:
        """True when epoch second ``t`` is inside the window."""
        local = self._local(t)
        minute = local.hour * 60 + local.minute
        today, yesterday = local.weekday(), (local.weekday() - 1) % 7
        if self.start_min < self.end_min:
            return today in self.days and self.start_min <= minute < self.end_min
        # crosses midnight: tonight's opening, or the tail of yesterday's
        return (today in self.days and minute >= self.start_min) or (
            yesterday in self.days and minute < self.end_min
        )

    def next_open(self, t: float) -> float:
        """``t`` when inside the window, else the epoch second the window next opens."""
        if self.contains(t):
            return t
        local = self._local(t)
        for ahead in range(8):
            day = local.date() + dt.timedelta(days=ahead)
            opens = dt.datetime.combine(
                day, dt.time(self.start_min // 60, self.start_min % 60), tzinfo=ZoneInfo(self.zone)
            ).timestamp()
            if day.weekday() in self.days and opens > t:
                return opens
        raise AssertionError(f"window {self.text} never opens")  # parse() refuses an empty day set

    def __str__(self) -> str:
        return self.text
