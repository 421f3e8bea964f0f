"""Rollout strategies: parsing, validation, wave sizes, failure budgets (selectors: :mod:`edgectl.labels`).

Pure functions over plain values, shared by the server (validating requests) and the CLI
(parsing flags), so both give the same message for the same mistake.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

from edgectl.control_plane.errors import InvalidArgument
from edgectl.window import MaintenanceWindow, WindowError

_WAVE_RE = re.compile(r"^(\d+)(%?)$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
DEFAULT_HEALTH_TIMEOUT_S = 120
OFFLINE_FAIL = 1
OFFLINE_SKIP = 2


def wave_sizes(waves: list[str], targets: int) -> list[int]:
    """Cumulative wave specs (``["1", "10%", "100%"]``) to per-wave device counts over ``targets``.

    Waves that add no device (e.g. 10% of 3 after a wave of 1) are dropped; the last wave must
    reach every target, so a rollout never stops short of the selector by accident.
    """
    if not waves:
        raise InvalidArgument("the strategy has no waves", hint="e.g. --strategy 1,10%,50%,100%")
    cumulative: list[int] = []
    for spec in waves:
        m = _WAVE_RE.fullmatch(spec.strip())
        if not m:
            raise InvalidArgument(
                f"wave {spec!r} is not a count or a percentage", hint="e.g. --strategy 1,10%,50%,100%"
            )
        number, pct = int(m.group(1)), bool(m.group(2))
        if pct and not 0 < number <= 100:
            raise InvalidArgument(f"wave {spec!r}: a percentage must be in 1%..100%")
        if not pct and number < 1:
            raise InvalidArgument(f"wave {spec!r}: a wave must move at least one device")
        count = math.ceil(targets * number / 100) if pct else number
        count = max(1, min(count, targets))
        if cumulative and count < cumulative[-1]:
            raise InvalidArgument(
                f"wave {spec!r} is smaller than the wave before it",
                hint="wave sizes are cumulative and must not shrink, e.g. 1,10%,50%,100%",
            )
        cumulative.append(count)
    if cumulative[-1] < targets:
        raise InvalidArgument(
            f"strategy {','.join(waves)} reaches {cumulative[-1]} of {targets} targeted devices",
            hint="end the strategy with 100%",
        )
    sizes: list[int] = []
    previous = 0
    for count in cumulative:
        if count > previous:
            sizes.append(count - previous)
            previous = count
    return sizes


def failure_budget(max_failures: str, targets: int) -> int:
    """``"3"`` or ``"5%"`` of ``targets`` as a device count; exceeding it stops the rollout."""
    spec = (max_failures or "0").strip()
    m = _WAVE_RE.fullmatch(spec)
    if not m:
        raise InvalidArgument(f"max failures {spec!r} is not a count or a percentage", hint="e.g. 0, 2 or 5%")
    number, pct = int(m.group(1)), bool(m.group(2))
    if pct:
        if number > 100:
            raise InvalidArgument(f"max failures {spec!r} is above 100%")
        return math.floor(targets * number / 100)
    return number


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``2m``, ``1h``, ``500ms`` into seconds."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise InvalidArgument(f"duration {text!r} is not understood", hint="e.g. 30s, 2m, 1h")
    value = float(m.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]


def parse_start_at(text: str, now: float) -> float:
    """``+2h`` / ``+30m`` (from ``now``) or ISO 8601 (``2026-12-01T02:00+01:00``; without an offset,
    the local time of the machine parsing it) into epoch seconds."""
    text = text.strip()
    if text.startswith("+"):
        return now + parse_duration(text[1:])
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise InvalidArgument(
            f"start time {text!r} is neither ISO 8601 nor relative",
            hint="e.g. --start-at +2h or --start-at 2026-12-01T02:00+01:00",
        ) from exc


def parse_window(text: str) -> MaintenanceWindow | None:
    """The maintenance window a strategy names (None for none), as an InvalidArgument when bad."""
    if not text.strip():
        return None
    try:
        return MaintenanceWindow.parse(text)
    except WindowError as exc:
        raise InvalidArgument(str(exc.args[0]), hint=exc.hint) from exc


@dataclass(frozen=True)
class StrategySpec:
    """A validated rollout strategy, as stored with the rollout."""

    waves: tuple[str, ...] = ("1", "10%", "50%", "100%")
    max_failures: str = "0"
    health_timeout_s: int = DEFAULT_HEALTH_TIMEOUT_S
    soak_s: int = 0
    max_error_rate: float = 0.0
    max_p99_ms: float = 0.0
    offline_policy: int = OFFLINE_FAIL
    continuous: bool = False  # keep following the selector after the waves
    start_at: float = 0.0  # epoch seconds; 0: at once
    window: str = ""  # maintenance window for swaps (edgectl.window); "": any time
    pause_after_waves: tuple[int, ...] = ()  # 1-based waves after which the rollout pauses
    # On-device trial (canary / shadow) and its soak gate; see protos/v1/rollouts.proto Strategy.
    canary_percent: float = 0.0
    shadow: bool = False
    min_agreement: float = 0.0
    max_p99_ratio: float = 0.0

    @property
    def trial(self) -> bool:
        """True when devices run the artifact as a canary or shadow before it becomes active."""
        return self.canary_percent > 0 or self.shadow

    def _validate_trial(self) -> None:
        if not 0 <= self.canary_percent <= 100:
            raise InvalidArgument(f"canary traffic {self.canary_percent}% must be between 0% and 100%")
        if self.canary_percent and self.shadow:
            raise InvalidArgument("choose --canary-traffic or --shadow, not both")
        if not 0 <= self.min_agreement <= 1:
            raise InvalidArgument(
                f"min agreement {self.min_agreement} must be between 0 and 1", hint="e.g. 0.95"
            )
        if self.max_p99_ratio < 0:
            raise InvalidArgument("max p99 ratio must not be negative", hint="e.g. 1.5")
        if (self.min_agreement or self.max_p99_ratio) and not self.trial:
            raise InvalidArgument(
                "--min-agreement and --max-p99-ratio compare a candidate with the current version",
                hint="add --canary-traffic 10% or --shadow",
            )
        if self.trial and self.soak_s <= 0:
            raise InvalidArgument(
                "a canary or shadow rollout needs a soak window to measure the candidate in",
                hint="add e.g. --soak 5m",
            )

    def validate(self, targets: int, syntax_only: bool = False) -> list[int]:
        """Check every field against ``targets`` devices; returns the wave sizes.

        A continuous rollout may start with no device: it waits for the first to match.
        ``syntax_only`` skips what depends on how many waves the targets make."""
        sizes = [] if self.continuous and targets == 0 else wave_sizes(list(self.waves), targets)
        parse_window(self.window)
        # Pausing after the last wave only means something when the rollout goes on following.
        last = len(sizes) if self.continuous else len(sizes) - 1
        for n in self.pause_after_waves:
            if n < 1:
                raise InvalidArgument(
                    f"--pause-after-wave {n}: waves are numbered from 1", hint="e.g. --pause-after-wave 1"
                )
            if sizes and not syntax_only and n > last:
                raise InvalidArgument(
                    f"--pause-after-wave {n}: this rollout has {len(sizes)} wave(s)",
                    hint=f"pick a wave from 1 to {last}"
                    if last
                    else "a single wave has nothing to pause before",
                )
        failure_budget(self.max_failures, targets)
        if self.health_timeout_s <= 0:
            raise InvalidArgument("health timeout must be positive", hint="e.g. --health-timeout 2m")
        if self.soak_s < 0 or self.max_error_rate < 0 or self.max_p99_ms < 0:
            raise InvalidArgument("soak window and thresholds must not be negative")
        if not 0 <= self.max_error_rate <= 1:
            raise InvalidArgument(f"max error rate {self.max_error_rate} must be between 0 and 1")
        if self.offline_policy not in (OFFLINE_FAIL, OFFLINE_SKIP):
            raise InvalidArgument("offline policy must be FAIL or SKIP")
        self._validate_trial()
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the rollout store keeps it."""
        return {
            "waves": list(self.waves),
            "max_failures": self.max_failures,
            "health_timeout_s": self.health_timeout_s,
            "soak_s": self.soak_s,
            "max_error_rate": self.max_error_rate,
            "max_p99_ms": self.max_p99_ms,
            "offline_policy": self.offline_policy,
            "continuous": self.continuous,
            "start_at": self.start_at,
            "window": self.window,
            "pause_after_waves": list(self.pause_after_waves),
            "canary_percent": self.canary_percent,
            "shadow": self.shadow,
            "min_agreement": self.min_agreement,
            "max_p99_ratio": self.max_p99_ratio,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> StrategySpec:
        """The inverse of :meth:`to_dict`; fields added later get their defaults."""
        return cls(
            waves=tuple(obj["waves"]),
            max_failures=obj["max_failures"],
            health_timeout_s=int(obj["health_timeout_s"]),
            soak_s=int(obj.get("soak_s", 0)),
            max_error_rate=float(obj.get("max_error_rate", 0.0)),
            max_p99_ms=float(obj.get("max_p99_ms", 0.0)),
            offline_policy=int(obj.get("offline_policy", OFFLINE_FAIL)),
            continuous=bool(obj.get("continuous", False)),
            start_at=float(obj.get("start_at", 0.0)),
            window=str(obj.get("window", "")),
            pause_after_waves=tuple(int(n) for n in obj.get("pause_after_waves", ())),
            canary_percent=float(obj.get("canary_percent", 0.0)),
            shadow=bool(obj.get("shadow", False)),
            min_agreement=float(obj.get("min_agreement", 0.0)),
            max_p99_ratio=float(obj.get("max_p99_ratio", 0.0)),
        )
