"""Time a candidate before its full evaluation: one clearly slower than a model it cannot win against
is not scored further.

The artifact is the fastest passing candidate, and with ``--quantize auto`` it must also beat the
float model. A candidate clearly slower than a model that already passes (or than that float model)
can never be chosen, so evaluating it on every sample is wasted work: on MiniLM a full evaluation
costs seconds, a short race a fraction of that. Its row keeps the first slice's score and says why
it stopped. Only where the evaluation is costly enough to be worth a race, and only on the target's
execution providers (timings elsewhere prove nothing about the target).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgectl.compress.evaluate import CLEARLY_SLOWER, Latency, Trial, measure_latency
from edgectl.compress.passes.base import PassContext

# Race first only when the rest of an evaluation would take longer than this (seconds, judged by the
# float model's own run over the evaluation samples): a race costs two sessions and a few runs.
WORTH_RACING_S = 1.0
# Rounds of the race: clearly slower in every one of them (paired, the same load saw both) is decided.
RACE_ROUNDS = 3

Race = Callable[[Sequence[Path]], list[Latency]]


@dataclass
class Pace:
    """The model a candidate must not be clearly slower than, and how to race against it.

    ``leader`` starts as the model ``auto`` must beat (None for an explicit mode: the first passing
    candidate leads) and moves to every passing candidate that raced faster than it.
    """

    race: Race
    leader: Path | None = None
    leader_name: str = ""
    _last: tuple[Path, float, float] | None = None  # the last race: candidate, its p50, the leader's

    def too_slow(self, candidate: Path) -> str | None:
        """A note when ``candidate`` is clearly slower than the leader in every round of a short race."""
        if self.leader is None:
            return None
        mine, theirs = self.race([candidate, self.leader])
        self._last = (candidate, mine.p50_ms, theirs.p50_ms)
        if not _clearly_slower(mine, theirs):
            return None
        return (
            f"raced first: {mine.p50_ms:.4g} ms against {theirs.p50_ms:.4g} ms for {self.leader_name}, "
            "clearly slower, so not evaluated further"
        )

    def passed(self, trial: Trial) -> None:
        """``trial`` passed the gate: it leads when nothing led, or when it raced faster than the leader."""
        if trial.path is None:
            return
        raced = self._last is not None and self._last[0] == trial.path
        if self.leader is None or (raced and self._last is not None and self._last[1] < self._last[2]):
            self.leader, self.leader_name = trial.path, trial.name


def pace_for(ctx: PassContext, must_beat: Path | None, first_slice: int) -> Pace | None:
    """The pace for one quantize search, or None where racing first does not pay or proves nothing."""
    ev = ctx.evaluator
    rest = ev.reference_seconds * max(0.0, 1.0 - first_slice / max(ev.data.count, 1))
    if not ctx.on_target or rest < WORTH_RACING_S:
        return None
    feed = ctx.data.feed(0)
    timer = ctx.timer

    def race(models: Sequence[Path]) -> list[Latency]:
        if timer is not None:
            return timer(models, feed)
        return measure_latency(models, feed, rounds=RACE_ROUNDS, round_s=0.05, providers=ctx.providers)

    return Pace(race, must_beat, "the float model" if must_beat else "")


def _clearly_slower(mine: Latency, theirs: Latency) -> bool:
    """Slower by more than CLEARLY_SLOWER in every shared round (by the medians when there are no rounds)."""
    pairs = list(zip(mine.rounds_ms, theirs.rounds_ms, strict=False))
    if len(pairs) >= RACE_ROUNDS:
        return all(m > (1 + CLEARLY_SLOWER) * t for m, t in pairs)
    return mine.p50_ms > (1 + CLEARLY_SLOWER) * theirs.p50_ms
