"""The one retry formula: exponential ceiling, full jitter under it, reset on success."""

from __future__ import annotations

import random
import statistics

import pytest

from edgectl.backoff import Backoff


def test_ceiling_doubles_from_min_and_stops_at_max() -> None:
    b = Backoff(0.5, 6.0)
    assert [b.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    assert b.ceiling(10_000) == 6.0  # a device that retried for weeks: no overflow, still the cap
    assert Backoff(0.0, 3.0).ceiling(5) == 0.0


def test_every_delay_lies_between_zero_and_the_ceiling() -> None:
    b = Backoff(0.2, 5.0, rng=random.Random(1))
    for _ in range(50):
        attempt = b.attempts + 1
        d = b.next()
        assert 0.0 <= d <= b.ceiling(attempt)
        assert b.attempts == attempt
    assert b.attempts == 50


def test_full_jitter_spreads_a_fleet_over_the_whole_window() -> None:
    # 1,000 devices that failed at the same moment: their retries must not land together.
    delays = [Backoff(1.0, 60.0, rng=random.Random(seed)).delay(4) for seed in range(1000)]
    assert min(delays) < 0.5 and max(delays) > 7.5  # the window is [0, 8 s]; both ends are used
    assert 3.5 < statistics.mean(delays) < 4.5  # uniform: the mean sits in the middle
    in_one_second = max(sum(1 for d in delays if k <= d < k + 1) for k in range(8))
    assert in_one_second < 200, "retries bunch up in one second of the window"


def test_reset_after_success_starts_again_from_the_first_ceiling() -> None:
    b = Backoff(1.0, 30.0, rng=random.Random(3))
    for _ in range(6):
        b.next()
    assert b.ceiling(b.attempts + 1) == 30.0
    b.reset()
    assert b.attempts == 0
    assert b.next() <= 1.0 and b.attempts == 1


def test_an_injected_random_makes_the_delays_repeatable() -> None:
    a = Backoff(0.1, 10.0, rng=random.Random(42))
    b = Backoff(0.1, 10.0, rng=random.Random(42))
    assert [a.next() for _ in range(8)] == [b.next() for _ in range(8)]
    c = Backoff(0.1, 10.0, rng=random.Random(43))
    assert [c.delay(5) for _ in range(3)] != [a.delay(5) for _ in range(3)]


@pytest.mark.parametrize(("lo", "hi", "factor"), [(-1.0, 1.0, 2.0), (2.0, 1.0, 2.0), (0.1, 1.0, 0.5)])
def test_nonsense_settings_are_refused(lo: float, hi: float, factor: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(lo, hi, factor=factor)
