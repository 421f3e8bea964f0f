"""The contract every recipe pass shares: ``run(state, config, ctx) -> PassResult``.

A pass is one class in one file with a typed config; the recipe (a dataclass with one optional
field per pass) says which passes run and with what parameters. The pipeline runs the passes of
each stage in recipe order and knows nothing about any one of them:

- ``float`` passes transform the float model (clean-up, pruning);
- ``quantize`` passes add candidate models that compete for the artifact (quantization, mixed precision);
- ``target`` passes turn the chosen model into files for the device (a TensorRT engine).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np

from edgectl.artifact import TrtEngine
from edgectl.compress.clock import StageClock
from edgectl.compress.data import SampleSet
from edgectl.compress.evaluate import Evaluator, Latency, QualityGate, Trial, measure_latency
from edgectl.devices import DeviceProfile

Stage = Literal["float", "quantize", "target"]
STAGES: tuple[Stage, ...] = ("float", "quantize", "target")
Progress = Callable[[str], None]
# A short fine-tune after pruning: reads the pruned ONNX and calibration samples, writes the tuned ONNX.
FineTune = Callable[[Path, Path, SampleSet], None]
# Times models on one feed, interleaved; injectable so tests can make a model "slower" deterministically.
Timer = Callable[[Sequence[Path], dict[str, np.ndarray]], list[Latency]]
ConfigT = TypeVar("ConfigT")
# Two timings this close are the same speed: noise on a shared host is a few percent.
SAME_SPEED = 0.03


@dataclass(frozen=True)
class ModelState:
    """What flows from pass to pass.

    ``model`` is the float graph the next float or quantize pass starts from and ``base`` its scored
    row (None while a float pass left it unscored: the pipeline scores the last one). ``candidates``
    are the finished models competing for the artifact; ``chosen`` is set before the target stage.
    """

    model: Path
    base: Trial | None
    candidates: tuple[Trial, ...] = ()
    chosen: Trial | None = None
    # What a later pass of the same stage builds on (e.g. the quantize search for mixed precision).
    notes: dict[str, Any] = field(default_factory=dict)
    # The model the artifact must be faster than (set by passes that promise a speed-up, e.g. auto).
    must_beat: Trial | None = None
    # Extra files for the artifact, by their path inside the bundle, and the engines among them.
    files: dict[str, Path] = field(default_factory=dict)
    engines: tuple[TrtEngine, ...] = ()


@dataclass(frozen=True)
class PassResult:
    """The state after a pass, the rows it built for the table, and what it adds to the manifest's record."""

    state: ModelState
    trials: tuple[Trial, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What every pass may use: the target, the evaluator and quality gate, data, a scratch folder."""

    work: Path
    profile: DeviceProfile
    evaluator: Evaluator
    gate: QualityGate
    calib: SampleSet | None
    vnni: bool
    progress: Progress = lambda _msg: None
    finetune: FineTune | None = None
    timer: Timer | None = None
    # The execution providers timings run on; False when the target's are not on this machine.
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    on_target: bool = True
    latency_rounds: int = 7
    # Recovery after pruning: training samples, and the float torch module when the model came as one.
    train: SampleSet | None = None
    torch_model: Any = None
    # Wall and CPU seconds per stage of the run (the report's breakdown).
    clock: StageClock = field(default_factory=StageClock)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> SampleSet:
        """The evaluation samples (the calibration samples stand in where a pass needs data and none was given)."""
        return self.evaluator.data

    def path(self, stem: str, suffix: str = ".onnx") -> Path:
        """A fresh file name in the scratch folder: passes never overwrite one another's models."""
        return self.work / f"{stem}-{next(self._counter)}{suffix}"

    def time(self, models: Sequence[Path], racing: Sequence[bool] | None = None) -> list[Latency]:
        """Latency of ``models`` on one sample, interleaved, on the target's execution providers.

        ``racing``: which models compete (a clearly slower one stops being timed early); the others
        are references, timed every round. None: every model is timed every round.
        """
        feed = self.data.feed(0)
        if self.timer is not None:
            return self.timer(models, feed)
        return measure_latency(
            models, feed, rounds=self.latency_rounds, providers=self.providers, racing=racing
        )

    def keep_not_slower(self, reference: Path, rewrites: Sequence[Path]) -> tuple[int | None, list[float]]:
        """Time ``reference`` and its ``rewrites`` interleaved on the target: the index of the fastest
        rewrite not slower than the reference (within SAME_SPEED), or None; and every p50 in ms,
        the reference's first. A rewrite ORT would have made better at load is dropped this way."""
        timings = self.time([reference, *rewrites], [False, *(True for _ in rewrites)])
        p50 = [t.p50_ms for t in timings]
        kept = [i for i, ms in enumerate(p50[1:]) if ms <= p50[0] * (1 + SAME_SPEED)]
        return min(kept, key=lambda i: p50[1 + i], default=None), p50

    def judge(self, trial: Trial) -> Trial:
        """Score ``trial`` against the float model and mark it passed or not (the one gate)."""
        return self.gate.judge(trial, self.evaluator)


class CompressPass(Generic[ConfigT]):
    """One optimisation: a name (its recipe field), the stage it runs in, and ``run``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    config: ClassVar[type]

    def check(self, config: ConfigT, profile: DeviceProfile, *, has_calib: bool) -> None:
        """Refuse, before any work, a config this target or these inputs can never run (by default none)."""

    def run(self, state: ModelState, config: ConfigT, ctx: PassContext) -> PassResult:
        """Turn ``state`` into the next state; raise a CompressError subclass the user can act on."""
        raise NotImplementedError

    def finish(self, record: dict[str, Any], chosen: Trial) -> dict[str, Any]:
        """This pass's manifest record once the artifact's model is chosen (by default unchanged)."""
        return record
