"""Choosing among timed candidates compares like with like: the rounds both models were timed in."""

from __future__ import annotations

from edgectl.compress.choice import fastest_passing as _choose
from edgectl.compress.evaluate import Latency, Trial


def _trial(name: str, latency: Latency) -> Trial:
    return Trial(name, "format", passed=True, latency=latency, size_bytes=1000)


def test_a_candidate_stopped_early_as_clearly_slower_is_not_chosen_on_its_earlier_rounds() -> None:
    # Rounds 1-3: the leader 1.0 ms, the other 1.2 ms (clearly slower, timing stopped). Rounds 4-7 ran
    # under heavier load: the leader's percentile over 7 rounds (1.6) is above the other's over 3 (1.2).
    leader = _trial("leader", Latency(1.6, 1.8, 7, rounds_ms=(1.0, 1.0, 1.0, 1.6, 1.7, 1.8, 1.9)))
    stopped = _trial("stopped", Latency(1.2, 1.2, 3, stopped_early=True, rounds_ms=(1.2, 1.2, 1.2)))
    assert _choose([stopped, leader]).name == "leader"


def test_latencies_are_compared_over_the_rounds_both_models_ran() -> None:
    baseline = Latency(2.0, 2.0, 3, stopped_early=True, rounds_ms=(2.0, 2.0, 2.0))
    quantized = Latency(2.4, 2.9, 7, rounds_ms=(1.5, 1.5, 1.5, 3.0, 3.0, 3.0, 3.0))
    # Its percentile over 7 rounds (2.4) is above the baseline's over 3 (2.0); in the same 3 it is faster.
    assert quantized.paired_ms(baseline) == (1.5, 2.0)
    # Without rounds (a test's timer) the percentiles are compared.
    assert Latency(1.0, 1.0, 1).paired_ms(Latency(2.0, 2.0, 1)) == (1.0, 2.0)
