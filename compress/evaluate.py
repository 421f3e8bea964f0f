"""The evaluator every pass result goes through: quality against the float model, latency, size.

Quality is the run's metric (``edgectl.compress.metrics``: top-1 with labels, else output cosine,
or what ``--metric`` names), always against the float model's outputs on the same samples. Latency is measured single-threaded with candidates interleaved
round by round, so a noisy neighbour or a clock change hits every candidate alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError, describe
from edgectl.compress.graph import cpu_session
from edgectl.compress.metrics import Metric, Quality, parse_metric


@dataclass(frozen=True)
class QualityGate:
    """The accuracy budget: a model passes when its quality drop from the float model is at most ``max_drop``."""

    max_drop: float

    def admits(self, drop: float) -> bool:
        """Whether a drop (in the metric's units) is inside the budget."""
        return drop <= self.max_drop + 1e-12  # a drop exactly at the budget must not fail on rounding

    def hopeless(self, drop: float, *, continuous: bool = False, samples: int = 0) -> bool:
        """A drop on a first small slice so far outside the budget that the full evaluation is not worth it.

        Five budgets, and for a stepped metric (top-1: one sample of a small slice is a big step) at
        least five points more than the budget; a continuous one (a cosine) needs one point more.
        A stepped metric's drop on ``samples`` samples counts lost samples: it must also be unlikely
        (< 1 %) from a model whose true drop is the budget (one flip in 8 is 0.125, yet 8 % likely at 0.01).
        """
        far = drop > max(5 * self.max_drop, self.max_drop + (0.01 if continuous else 0.05))
        if continuous or not samples or not far:
            return far
        return _binomial_tail(math.ceil(drop * samples - 1e-9), samples, self.max_drop) < 0.01

    def within_reach(self, drop: float) -> bool:
        """A drop that calibration, smoothing or granularity variants can plausibly close."""
        return drop <= 3 * self.max_drop + 0.002

    def judge(self, trial: Trial, evaluator: Evaluator) -> Trial:
        """Score ``trial``'s model against the float reference and mark it passed or not."""
        assert trial.path is not None, "only a built model can be judged"
        trial.quality = evaluator.quality(trial.path)
        trial.drop = trial.quality.drop_from(evaluator.baseline)
        trial.passed = self.admits(trial.drop)
        return trial


@dataclass(frozen=True)
class Latency:
    """Single-sample latency percentiles over warm runs, in milliseconds."""

    p50_ms: float
    p90_ms: float
    runs: int
    # Timing stopped before the last round: clearly slower than the fastest candidate (``out_of_race``).
    stopped_early: bool = False
    # The median of each round, in round order: models timed together share their first rounds.
    rounds_ms: tuple[float, ...] = ()

    def paired_ms(self, other: Latency) -> tuple[float, float]:
        """This model's and ``other``'s median over the rounds both were timed in (the same load saw
        both); percentiles over different rounds compare a quiet spell with a busy one."""
        shared = min(len(self.rounds_ms), len(other.rounds_ms))
        if not shared:
            return self.p50_ms, other.p50_ms
        return float(np.median(self.rounds_ms[:shared])), float(np.median(other.rounds_ms[:shared]))


def run_model(session: Any, data: SampleSet, *, batch: int = 32) -> list[np.ndarray]:
    """Run ``data`` through an ORT session in batches; outputs concatenated along axis 0."""
    parts: list[list[np.ndarray]] = []
    for feed in data.batches(batch):
        outs = session.run(None, feed)
        parts.append([np.asarray(o) for o in outs])
    if len(parts) == 1:
        return parts[0]
    # A scalar output (a shape, a count) has no sample axis: the first batch's stands for all.
    return [
        np.concatenate([p[i] for p in parts], axis=0) if parts[0][i].ndim else parts[0][i]
        for i in range(len(parts[0]))
    ]


class Evaluator:
    """Scores candidate ONNX models against the float reference on one sample set."""

    def __init__(
        self,
        reference: Path,
        data: SampleSet,
        *,
        metric: Metric | None = None,
        providers: tuple[str, ...] = (),
        batch: int = 32,
    ):
        self.data = data
        self.providers = providers
        self._batch = batch
        self.scorer = metric or parse_metric(
            None, input_names=list(data.inputs), has_labels=data.labels is not None
        )
        # Scoring uses every core: only the latency comparison needs one thread.
        try:
            session = cpu_session(reference, threads=0, providers=providers)
        except Exception as exc:  # a graph ORT refuses (INVALID_GRAPH, NOT_IMPLEMENTED): input, not a crash
            raise BadInputError(
                f"ONNX Runtime cannot load the float model: {describe(exc)}",
                hint="check it loads with onnxruntime.InferenceSession(path); torch's dynamo exporter writes "
                "opset 18 and converts down to a lower opset_version, which can leave ops that opset lacks "
                "(export with opset_version=18 or later)",
            ) from exc
        try:
            started = time.perf_counter()
            self._reference = run_model(session, data, batch=batch)
            # What one full evaluation of a model like this one costs (a candidate's race is weighed against it).
            self.reference_seconds = time.perf_counter() - started
        except Exception as exc:  # ORT's errors have no common base; any of them means the same here
            raise BadInputError(
                f"the float model fails on the {data.source}: {describe(exc)}",
                hint="check the samples' shapes against the model's inputs; an export traced at one shape "
                "may need dynamic axes (torch.onnx.export(..., dynamic_axes=...))",
            ) from exc
        nan = [i for i, o in enumerate(self._reference) if o.dtype.kind in "fc" and np.isnan(o).any()]
        if nan:
            # Every comparison with NaN fails alike: each candidate would "match" the float model.
            raise BadInputError(
                f"the float model outputs NaN on the {data.source} (output {nan[0]}): no candidate can be "
                "compared with it",
                hint="check the samples are what the model expects (scale, dtype, token ids in range)",
            )
        # A user's metric is called here first: one that cannot score the float model fails before any work.
        self.baseline = self._score(self._reference)
        self.scorer.check_best_at_reference(data.inputs, self._reference, self.baseline)

    @property
    def metric(self) -> str:
        """The quality metric in use, as given (``top1``, ``cosine``, ``masked-cosine:mask``, ``pkg.mod:fn``)."""
        return self.scorer.name

    def _score(self, outputs: Sequence[np.ndarray], count: int | None = None) -> Quality:
        count = None if count is None else self.data.aligned(count)
        data = self.data if count is None else self.data.take(count)
        reference = self._reference if count is None else [r[:count] for r in self._reference]
        return self.scorer.score(data.inputs, data.labels, reference, list(outputs))

    def outputs(self, model: Path | bytes, *, samples: int | None = None) -> list[np.ndarray]:
        """All outputs of ``model`` on the evaluation samples (the first ``samples`` of them if given)."""
        data = self.data if samples is None else self.data.take(samples)
        return run_model(cpu_session(model, threads=0, providers=self.providers), data, batch=self._batch)

    def quality(self, model: Path | bytes, *, samples: int | None = None) -> Quality:
        """Quality of ``model`` on the evaluation samples (the first ``samples`` of them if given)."""
        count = None if samples is None or samples >= self.data.count else samples
        return self._score(self.outputs(model, samples=count), count)

    def staged_quality(
        self, model: Path, first: int, stop: Callable[[float], bool]
    ) -> tuple[Quality, float, bool]:
        """Score on the first ``first`` samples and, unless ``stop(drop there)``, on all of them.

        One session serves both and the first slice's outputs are kept, so the full score costs
        only the remaining samples. Returns the quality, its drop, and whether it stopped early.
        """
        first = self.data.aligned(first) if first else 0
        if not first or self.data.count < 2 * first:
            quality = self.quality(model)
            return quality, quality.drop_from(self.baseline), False
        session = cpu_session(model, threads=0, providers=self.providers)
        head = run_model(session, self.data.take(first), batch=self._batch)
        quick = self._score(head, first)
        drop = quick.drop_from(self.baseline_on(first))
        if stop(drop):
            return quick, drop, True
        tail = run_model(session, self.data.part(first), batch=self._batch)
        quality = self._score([np.concatenate([h, t], axis=0) for h, t in zip(head, tail, strict=True)])
        return quality, quality.drop_from(self.baseline), False

    def baseline_on(self, samples: int) -> Quality:
        """The float model's own quality on the first ``samples`` samples."""
        count = self.data.aligned(min(samples, self.data.count))
        return self._score([r[:count] for r in self._reference], count)

    def latency(self, models: Sequence[Path], *, rounds: int = 7, round_s: float = 0.15) -> list[Latency]:
        """Interleaved single-threaded latency of ``models`` on one sample (batch of one)."""
        return measure_latency(
            models, self.data.feed(0), rounds=rounds, round_s=round_s, providers=self.providers
        )


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    p = min(max(p, 0.0), 1.0)
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1))


# A candidate slower than the leader by more than this in every round so far is out of the race.
CLEARLY_SLOWER = 0.10
# A quantized model is faster than the float one only beyond this (round-to-round noise on one thread):
# a model 1 % "faster" with nothing quantized in it is within noise of it, and may well be slower.
SPEEDUP_MARGIN = 0.02
# Runs per model and round: enough for ``round_s``, at most MAX_RUNS_PER_ROUND, but never fewer than
# fill MIN_ROUND_S. A 16 us model capped at 200 runs had 3 ms rounds, and one scheduler blip in a round
# chose a candidate 7-10 % slower than the best one in one search of six (digits CNN, pruned).
MAX_RUNS_PER_ROUND = 200
MIN_ROUND_S = 0.025


def runs_per_round(run_s: float, round_s: float) -> int:
    """How many runs of a model taking ``run_s`` fill one round of ``round_s`` (bounded, see above)."""
    run_s = max(run_s, 1e-6)
    cap = max(MAX_RUNS_PER_ROUND, int(min(MIN_ROUND_S, round_s) / run_s))
    return max(2, min(cap, int(round_s / run_s)))


def measure_latency(
    models: Sequence[Path],
    feed: dict[str, np.ndarray],
    *,
    rounds: int = 7,
    round_s: float = 0.15,
    providers: tuple[str, ...] = (),
    racing: Sequence[bool] | None = None,
    min_rounds: int = 3,
) -> list[Latency]:
    """Time each model on ``feed`` with one intra-op thread, interleaved over ``rounds`` rounds.

    Each round runs every model ``n`` times (``n`` sized so a round lasts about ``round_s`` per model),
    rotating the order so no model always runs first after another's cache footprint. With
    ``racing`` (one flag per model), a model ``out_of_race`` finds clearly slower than the fastest
    racer stops being timed, and timing ends when only that racer is left. On ORT's CPU EP
    with one intra-op thread the model runs on the calling thread, so that thread's CPU time is its
    latency minus the time the OS gave other processes: on a shared host, wall time mostly measures
    the neighbours. Any other EP (a GPU works while the thread waits) is timed by the wall clock.
    """
    sessions = [cpu_session(m, threads=1, providers=providers) for m in models]
    clock = time.thread_time if set(providers) <= {"CPUExecutionProvider"} else time.perf_counter
    iters: list[int] = []
    for s in sessions:
        for _ in range(2):  # warm-up: first runs allocate arenas and pick kernels
            s.run(None, feed)
        t0 = clock()
        s.run(None, feed)
        iters.append(runs_per_round(clock() - t0, round_s))
    samples: list[list[float]] = [[] for _ in sessions]
    per_round: list[list[float]] = [[] for _ in sessions]
    active = [True] * len(sessions)
    for r in range(rounds):
        order = list(range(len(sessions)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in (i for i in order if active[i]):
            this_round = []
            for _ in range(iters[i]):
                t0 = clock()
                sessions[i].run(None, feed)
                this_round.append((clock() - t0) * 1000.0)
            samples[i] += this_round
            per_round[i].append(float(np.median(this_round)))
        if racing is not None and r + 1 < rounds:
            for i in out_of_race(per_round, racing, active, min_rounds=min_rounds):
                active[i] = False
            if sum(active) < 2:
                break  # every comparison is decided: the fastest racer's rounds so far are its timing
    return [
        Latency(
            float(np.percentile(s, 50)), float(np.percentile(s, 90)), len(s), stopped_early=not a,
            rounds_ms=tuple(r),
        )
        for s, a, r in zip(samples, active, per_round, strict=True)
    ]  # fmt: skip


def out_of_race(
    per_round: Sequence[Sequence[float]],
    racing: Sequence[bool],
    active: Sequence[bool],
    *,
    min_rounds: int = 3,
    margin: float = CLEARLY_SLOWER,
) -> list[int]:
    """The models to stop timing, by a paired test over at least ``min_rounds`` rounds (the same
    rounds saw the same load): racers slower than the fastest racer by more than ``margin`` in every
    round, and references (the models to beat) slower than it by as much: the decision is made.
    """
    live = [i for i, (r, a) in enumerate(zip(racing, active, strict=True)) if r and a]
    if not live:
        return []
    leader = min(live, key=lambda i: float(np.median(per_round[i])))
    out = []
    for i in (i for i, a in enumerate(active) if a):
        if len(live) < 2 and racing[i]:
            continue
        mine, best = per_round[i], per_round[leader]
        if i == leader or len(mine) < min_rounds or len(mine) != len(best):
            continue
        if all(m > (1 + margin) * b for m, b in zip(mine, best, strict=True)):
            out.append(i)
    return out


@dataclass
class Trial:
    """One row of the comparison table: a model that was built and scored, and whether it passed."""

    name: str
    stage: str
    path: Path | None = None
    config: dict[str, object] | None = None
    quality: Quality | None = None
    drop: float | None = None
    passed: bool | None = None
    latency: Latency | None = None
    size_bytes: int | None = None
    macs: int | None = None
    params: int | None = None
    note: str = ""
    # Raced before its full evaluation and clearly slower than the model it had to beat (not scored further).
    raced_slower: bool = False

    def to_dict(self) -> dict[str, object]:
        """JSON-ready row (no file paths: they point into a temporary folder)."""
        return {
            "name": self.name,
            "stage": self.stage,
            "metric": self.quality.metric if self.quality else None,
            "quality": _round(self.quality.score if self.quality else None),
            "min_cosine": _round(self.quality.min_cosine if self.quality else None),
            "drop": _round(self.drop),
            "passed": self.passed,
            "p50_ms": _round(self.latency.p50_ms if self.latency else None, 4),
            "p90_ms": _round(self.latency.p90_ms if self.latency else None, 4),
            "size_bytes": self.size_bytes,
            "macs": self.macs,
            "params": self.params,
            "config": self.config,
            "note": self.note,
        }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)
