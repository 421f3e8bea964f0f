"""Where the time of one compress run goes: wall and CPU seconds per named stage.

Every stage of the pipeline and every pass runs its costly steps inside ``clock.stage(name)``; the
report prints the lines (the breakdown the user sees) and the manifest keeps them. CPU seconds are
the process's (every ORT thread included): on a shared host the wall clock also counts the
neighbours, the CPU seconds do not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class StageTime:
    """Accumulated seconds of one named stage and how many times it ran."""

    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    count: int = 0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, rounded to milliseconds."""
        return {
            "stage": self.name,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "count": self.count,
        }


class StageClock:
    """Seconds per stage, in the order the stages first ran.

    A stage opened inside another counts only in its own row (its parent's row keeps the rest), so
    the lines add up to the run's time: a pass can be timed as a whole by the pipeline and in steps
    by itself.
    """

    def __init__(self) -> None:
        self._stages: dict[str, StageTime] = {}
        self._open: list[list[float]] = []  # per open stage: seconds its children took (wall, cpu)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block and add it to ``name``'s row (also when the block raises)."""
        row = self._stages.setdefault(name, StageTime(name))
        children = [0.0, 0.0]
        self._open.append(children)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            self._open.pop()
            row.wall_s += wall - children[0]
            row.cpu_s += cpu - children[1]
            row.count += 1
            if self._open:
                self._open[-1][0] += wall
                self._open[-1][1] += cpu

    @property
    def stages(self) -> list[StageTime]:
        """Every stage timed so far, in first-run order."""
        return list(self._stages.values())

    def to_list(self) -> list[dict[str, object]]:
        """For the manifest's metrics."""
        return [s.to_dict() for s in self._stages.values()]


def _num(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def breakdown_lines(stages: list[dict[str, object]], total_s: float) -> list[str]:
    """The report's lines, one per stage: wall seconds, share of the total, CPU seconds, runs."""
    lines = []
    for s in stages:
        wall, cpu, count = _num(s["wall_s"]), _num(s["cpu_s"]), int(_num(s["count"]))
        share = 100.0 * wall / total_s if total_s > 0 else 0.0
        runs = f" x{count}" if count > 1 else ""
        lines.append(f"{s['stage']!s:<34} {wall:7.2f} s {share:5.1f} %  cpu {cpu:7.2f} s{runs}")
    rest = total_s - sum(_num(s["wall_s"]) for s in stages)
    lines.append(f"{'(between stages)':<34} {rest:7.2f} s")
    lines.append(f"{'total (time to artifact)':<34} {total_s:7.2f} s")
    return lines
