"""Maintenance windows: parsing, membership and the next opening, across zones, midnight and DST."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from edgectl.control_plane.errors import InvalidArgument
from edgectl.control_plane.strategy import parse_start_at, parse_window
from edgectl.window import MaintenanceWindow, WindowError

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def test_weekday_window_in_berlin() -> None:
    w = MaintenanceWindow.parse("Mon-Fri 01:00-04:00 Europe/Berlin")
    assert w.days == frozenset(range(5)) and w.zone == "Europe/Berlin"
    assert w.contains(at("2026-12-01T01:00"))  # a Tuesday, the opening minute
    assert w.contains(at("2026-12-01T03:59:59"))
    assert not w.contains(at("2026-12-01T04:00"))  # end is exclusive
    assert not w.contains(at("2026-12-05T02:00"))  # Saturday
    # 01:00 Berlin is 00:00 UTC in winter: the same instant, read in another zone
    assert w.contains(at("2026-12-01T00:30", ZoneInfo("UTC")))
    # after Friday's window the next one is Monday 01:00
    assert w.next_open(at("2026-12-04T05:00")) == at("2026-12-07T01:00")
    assert w.next_open(at("2026-12-01T02:00")) == at("2026-12-01T02:00")  # open now


def test_window_across_midnight_and_lists_and_defaults() -> None:
    w = MaintenanceWindow.parse("Sat,Sun 22:00-02:00")
    assert w.zone == "UTC" and w.days == frozenset({5, 6})
    utc = ZoneInfo("UTC")
    assert w.contains(at("2026-12-05T23:00", utc))  # Saturday night
    assert w.contains(at("2026-12-07T01:00", utc))  # Sunday's window runs into Monday
    assert not w.contains(at("2026-12-08T01:00", utc))  # Monday's would-be tail: no Monday window
    assert w.next_open(at("2026-12-07T03:00", utc)) == at("2026-12-12T22:00", utc)
    daily = MaintenanceWindow.parse("02:00-03:00 Europe/Berlin")
    assert daily.days == frozenset(range(7))
    assert MaintenanceWindow.parse("Fri-Mon 00:00-24:00").days == frozenset({4, 5, 6, 0})


def test_daylight_saving_change_keeps_local_hours() -> None:
    w = MaintenanceWindow.parse("daily 03:00-04:00 Europe/Berlin")
    # 2026-03-29: clocks go from 02:00 to 03:00 in Berlin; the window still opens at 03:00 local
    opens = w.next_open(at("2026-03-28T12:00"))
    assert datetime.fromtimestamp(opens, BERLIN).isoformat() == "2026-03-29T03:00:00+02:00"


@pytest.mark.parametrize(
    "text",
    ["", "Mon-Fri", "Mon-Fri 1:00", "Funday 01:00-02:00", "01:00-01:00", "25:00-26:00",
     "Mon 01:00-02:00 Mars/Olympus", "Mon 01:00-02:00 UTC extra"],
)  # fmt: skip
def test_bad_windows_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(WindowError) as err:
        MaintenanceWindow.parse(text)
    assert err.value.hint
    if text:
        with pytest.raises(InvalidArgument):
            parse_window(text)


def test_start_at_relative_and_iso() -> None:
    now = 1_800_000_000.0
    assert parse_start_at("+2h", now) == now + 7200
    assert parse_start_at("+30m", now) == now + 1800
    assert parse_start_at("2026-12-01T02:00+01:00", now) == at("2026-12-01T02:00")
    assert parse_start_at("2026-12-01T01:00Z", now) == at("2026-12-01T02:00")
    with pytest.raises(InvalidArgument):
        parse_start_at("tomorrow", now)
    with pytest.raises(InvalidArgument):
        parse_start_at("+soon", now)
