"""Download progress becomes few events: quarter marks, spaced by an interval, whatever the size."""

from __future__ import annotations

import pytest

from edgectl.agent.report import FetchProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _events(total: int, steps: int, seconds: float, interval_s: float) -> list[int]:
    """The ``done`` values reported for a download of ``total`` bytes in ``steps`` equal chunks."""
    clock = Clock()
    progress = FetchProgress(interval_s, clock)
    out = []
    for i in range(1, steps + 1):
        clock.now = seconds * i / steps
        done = total * i // steps
        if progress.due(done, total):
            out.append(done)
    return out


@pytest.mark.parametrize("total", [5_000_000, 50_000_000, 500_000_000])
def test_a_slow_download_reports_its_quarters_only(total: int) -> None:
    # 1000 chunks over 10 minutes: one event per second before; now one per quarter, any size.
    done = _events(total, 1000, 600.0, 10.0)
    assert [d * 4 // total for d in done] == [1, 2, 3]


def test_a_quick_download_reports_nothing_but_its_start_and_end() -> None:
    assert _events(50_000_000, 200, 4.0, 10.0) == []  # FETCH_STARTED and STAGED say the rest


def test_a_quarter_passed_within_the_interval_is_reported_once_the_interval_is_over() -> None:
    # Quarters at 2.5 s, 5 s, 7.5 s, interval 4 s: the first quarter shows at 4 s (40 % done), the
    # next event at 8 s is already past the third quarter: at most one event per interval.
    done = _events(100, 100, 10.0, 4.0)
    assert [(d, d * 4 // 100) for d in done] == [(40, 1), (80, 3)]


def test_interval_zero_reports_every_quarter_and_never_the_end() -> None:
    assert _events(1000, 8, 1.0, 0.0) == [250, 500, 750]
    assert not FetchProgress(0.0).due(0, 0)  # an empty artifact
