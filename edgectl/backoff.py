"""Retry delays: exponential growth with full jitter, the one formula every retry loop uses.

Full jitter (a uniform draw between 0 and the exponential ceiling) is what keeps a fleet from
retrying in lock-step: after a control-plane restart a thousand agents that failed together
spread their retries over the whole window instead of arriving as one thundering herd.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for attempt 1, 2, 3…: uniform in [0, min(max_s, min_s * factor ** (attempt - 1))].

    Stateful use (``next``/``reset``) counts the attempts for the caller; ``delay(attempt)`` serves
    callers that keep their own count (one per retried item). Pass ``rng`` for repeatable tests.
    """

    def __init__(
        self, min_s: float, max_s: float, *, factor: float = 2.0, rng: random.Random | None = None
    ) -> None:
        if min_s < 0 or max_s < min_s or factor < 1:
            raise ValueError(
                f"backoff needs 0 <= min_s <= max_s and factor >= 1 (got {min_s}, {max_s}, {factor})"
            )
        self.min_s = min_s
        self.max_s = max_s
        self.factor = factor
        self._rng = rng or random.Random()
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """Failed attempts since the last ``reset`` (what ``next`` has counted)."""
        return self._attempts

    def ceiling(self, attempt: int) -> float:
        """The longest delay after failed attempt ``attempt`` (1-based): the exponential cap."""
        exponent = max(0, attempt - 1)
        # The exponent stops at 64 (far past any cap): a float power overflows long before an
        # agent that retries for weeks runs out of attempts.
        return min(self.max_s, self.min_s * self.factor ** min(exponent, 64))

    def delay(self, attempt: int) -> float:
        """A jittered delay for failed attempt ``attempt`` (1-based), without touching the count."""
        return self._rng.uniform(0.0, self.ceiling(attempt))

    def next(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        self._attempts += 1
        return self.delay(self._attempts)

    def reset(self) -> None:
        """A success: the next failure waits as little as the first one did."""
        self._attempts = 0
