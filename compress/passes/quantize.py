"""The quantize pass: build candidates, score each, widen the search only when the budget is missed.

Order of escalation: format/type candidates (whose speed depends on the execution provider, so
they are timed later), then calibration and granularity variants of the best one. When none
passes, the mixed-precision pass (if the recipe has it) keeps the most sensitive nodes in float.
Every model built is a Trial in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from edgectl.compress.clock import StageClock
from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError, describe
from edgectl.compress.evaluate import Evaluator, QualityGate, Trial
from edgectl.compress.graph import quantized_ops
from edgectl.compress.passes.base import CompressPass, ModelState, PassContext, PassResult
from edgectl.compress.passes.gemm import (
    MATMUL_MODES,
    has_linear_weights,
    has_weight_matmul,
    linear_gemms,
    rewrite_changes,
)
from edgectl.compress.passes.pace import Pace, pace_for
from edgectl.compress.passes.quant_modes import QuantizeConfig, candidates, resolve_modes
from edgectl.compress.quantizer import (
    QuantConfig,
    QuantMode,
    float_by_rule,
    ort_default,
    quality_variants,
    quantize,
    stem_variants,
)
from edgectl.devices import DeviceProfile

Progress = Callable[[str], None]
# Samples in the first slice a candidate is scored on before the full evaluation.
QUICK_SLICE = 8
# The key under which this pass leaves its search for the passes after it (mixed precision).
SEARCH_NOTE = "quantize.search"


@dataclass
class SearchResult:
    """Every quantized trial of one search, the best-scoring config, and what the search noticed."""

    base: Path
    mode: QuantMode
    step: QuantizeConfig
    trials: list[Trial] = field(default_factory=list)
    best: QuantConfig | None = None
    notes: list[str] = field(default_factory=list)


class QuantSearch:
    """Runs the escalating search for one base model against one evaluator and quality gate."""

    def __init__(
        self,
        evaluator: Evaluator,
        calib: SampleSet | None,
        work: Path,
        max_drop: float,
        progress: Progress,
        clock: StageClock | None = None,
        pace: Pace | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.clock = clock or StageClock()
        self.calib = calib
        self.work = work
        self.gate = QualityGate(max_drop)
        self.progress = progress
        self._count = 0
        # Nodes static int8 leaves float by rule (node -> reason), and the first-slice size for pruning.
        self.keep_float: dict[str, str] = {}
        self.first_slice = QUICK_SLICE
        self._cut: list[Trial] = []  # trials stopped on the first slice as hopeless
        # Raced before their full evaluation (None: never): the clearly slower ones stop there.
        self.pace = pace

    def trial(self, base: Path, config: QuantConfig, stage: str, note: str = "") -> Trial:
        """Quantize ``base`` per ``config`` and score it."""
        out = self.work / f"candidate{self._count}.onnx"
        while out.exists():  # another search may share the folder
            self._count += 1
            out = self.work / f"candidate{self._count}.onnx"
        self.progress(f"{stage}: {config.label()}")
        trial = Trial(config.label(), stage, config=config.to_dict(), note=note)
        try:
            # Dynamic quantization needs no calibration, but SmoothQuant does: fall back to the eval samples.
            data = self.calib or (self.evaluator.data if config.smooth_alpha else None)
            with self.clock.stage(f"quantize: build {config.mode}"):
                quantize(base, out, config, data, cache=self.work / "calibration-cache")
            trial.path = out
            with self.clock.stage("quantize: score candidates"):
                self._score(trial)
        except BadInputError:
            raise
        except Exception as exc:  # a candidate the quantizer or ORT rejects is a failed row, not a crash
            trial.path, trial.quality, trial.passed = None, None, False
            trial.note = f"failed: {describe(exc, 160)}"
            return trial
        trial.size_bytes = out.stat().st_size
        return trial

    def _score(self, trial: Trial) -> None:
        """Score on a first small slice; a drop far outside the budget there ends the trial (not timed)."""
        assert trial.path is not None
        path, n = trial.path, self.first_slice
        continuous = self.evaluator.scorer.continuous
        slow: list[str] = []

        def stop(drop: float) -> bool:
            if self.gate.hopeless(drop, continuous=continuous, samples=n):
                return True
            why = self.pace.too_slow(path) if self.pace is not None else None
            slow.extend([why] if why else [])
            return bool(why)

        quality, drop, stopped = self.evaluator.staged_quality(path, n, stop)
        trial.quality, trial.drop = quality, drop
        trial.passed = False if stopped else self.gate.admits(drop)
        if stopped:
            trial.raced_slower = bool(slow)
            if not slow:
                self._cut.append(trial)
            why = (
                slow[0]
                if slow
                else f"hopeless: drop {drop:.4f} on the first {n} samples, not evaluated further"
            )
            trial.note = f"{trial.note}; {why}" if trial.note else why
        elif trial.passed and self.pace is not None:
            self.pace.passed(trial)

    def _fair(self, trials: list[Trial]) -> list[Trial]:
        """``trials`` without those stopped for speed: their first-slice scores do not rank a mode."""
        return [t for t in trials if not t.raced_slower]

    def run(
        self,
        base: Path,
        step: QuantizeConfig,
        modes: QuantMode | Sequence[QuantMode],
        profile: DeviceProfile,
        *,
        vnni: bool,
    ) -> SearchResult:
        """All trials for ``base`` in every mode; the caller times the passing ones and keeps the fastest."""
        mode_list: list[QuantMode] = [modes] if isinstance(modes, str) else list(modes)
        result = SearchResult(base, mode_list[0], step)
        first: list[QuantConfig] = []
        for mode in mode_list:
            for config in candidates(step, mode, profile, vnni=vnni):
                if mode == "int8-static" and self.keep_float:
                    config = config.with_(keep_float=tuple(sorted(self.keep_float)))
                first.append(config)
            if step.search and rewrite_changes(base, mode):
                # The mode's lead also with the Gemms as they are: timed against it, so the Gemm
                # rewrite is kept only where it is not slower.
                hint = next(c for c in first if c.mode == mode)
                first.append(hint.with_(gemm_as_matmul=False))
        if step.search and "CPUExecutionProvider" in profile.providers_for("int8"):
            first += stem_variants(base, first)  # image CNNs: the stem's layout, timed like the formats
        leads: dict[str, Trial] = {}  # each mode's first candidate: the profile's hint, per-channel
        for config in first:
            default = ort_default(config.mode).with_(
                calib_samples=step.calib_samples, keep_float=config.keep_float
            )
            int8 = config.mode in ("int8-static", "int8-dynamic")
            note = "ORT defaults" if int8 and config == default else ""
            lead = leads.get(config.mode)
            if lead is not None and any(lead is t for t in self._cut):
                # Formats and types move speed, not a drop this far outside the budget: not built.
                result.trials.append(_skipped(config, lead, note, "was hopeless"))
                continue
            finer = _finer_failed(config, result.trials)
            if finer is not None:
                # Per-channel scales fit each channel at least as well as one scale for the tensor.
                result.trials.append(_skipped(config, finer, note, "(per-channel) missed the budget"))
                continue
            result.trials.append(self.trial(base, config, "format", note))
            leads.setdefault(config.mode, result.trials[-1])
        scored = [t for t in result.trials if t.quality is not None]
        if not scored:
            result.notes.append("no quantized candidate could be built")
            return result
        if step.search:
            model = onnx.load(str(base), load_external_data=False)
            has_matmul = has_weight_matmul(model)
            gemms = bool(linear_gemms(model))  # MatMuls too for the modes that rewrite them
            for mode in self._worth_escalating(mode_list, result.trials):
                matmul = has_matmul or (gemms and mode in MATMUL_MODES)
                self._escalate(base, step, mode, first, result, has_matmul=matmul)
        result.best = _best_config(self._fair(result.trials))
        result.mode = result.best.mode if result.best else result.mode
        return result

    def _worth_escalating(self, modes: list[QuantMode], trials: list[Trial]) -> list[QuantMode]:
        """The int8 modes with no passing candidate whose best drop is within reach of the budget.

        A passing weight-only or fp16 model does not stop the search: an int8 model that passes after
        smoothing is usually faster. When nothing passed and every mode looked hopeless, the best
        mode is still escalated: a calibration or smoothing variant may be what it lacked.
        """
        out: list[QuantMode] = []
        trials = self._fair(trials)  # a mode raced slower than the leader is no faster after smoothing
        for mode in modes:
            own = [t for t in trials if t.config and t.config.get("mode") == mode and t.quality is not None]
            reachable = [t for t in own if t.drop is not None and self.gate.within_reach(t.drop)]
            if (
                mode in ("int8-static", "int8-dynamic")
                and own
                and reachable
                and not any(t.passed for t in own)
            ):
                out.append(mode)
        if not out and not any(t.passed for t in trials):
            best = _best_config(trials)
            if best is not None and best.mode in ("int8-static", "int8-dynamic"):
                out.append(best.mode)
        return out

    def _escalate(
        self,
        base: Path,
        step: QuantizeConfig,
        mode: QuantMode,
        first: list[QuantConfig],
        result: SearchResult,
        *,
        has_matmul: bool,
    ) -> None:
        """Calibration, smoothing and granularity variants of ``mode``'s best config, until one passes."""
        own = [
            t
            for t in self._fair(result.trials)
            if t.config and t.config.get("mode") == mode and t.quality is not None
        ]
        if not own:
            return
        best_trial = max(own, key=lambda t: t.quality.score if t.quality else -1.0)
        best = QuantConfig(**_config_args(best_trial.config))
        for variant in quality_variants(best, has_matmul=has_matmul):
            if step.calibration != "auto" and variant.calibration != best.calibration:
                continue
            t = self.trial(base, variant, "calibration")
            result.trials.append(t)
            if t.passed:
                self._formats_with(base, first, variant, result)
                return
            if t.quality and best_trial.quality and t.quality.score > best_trial.quality.score:
                best_trial, best = t, variant

    def _formats_with(
        self, base: Path, first: list[QuantConfig], passed: QuantConfig, result: SearchResult
    ) -> None:
        """Every format/type candidate again with the calibration and smoothing that passed.

        Which format is fastest depends on the EP and the CPU, not on the quality knobs: without this
        the first format that passes after smoothing would win unmeasured.
        """
        seen = {QuantConfig(**_config_args(t.config)) for t in result.trials if t.config}
        for config in first:
            if config.mode != passed.mode:
                continue  # the knobs that passed belong to one mode
            c = config.with_(calibration=passed.calibration, smooth_alpha=passed.smooth_alpha)
            if passed.smooth_alpha:  # smoothing moves outliers into weight rows: per-tensor weights lose them
                c = c.with_(per_channel=True)
            if c not in seen:
                seen.add(c)
                result.trials.append(self.trial(base, c, "format", f"with {_knobs(passed)}"))


class QuantizePass(CompressPass[QuantizeConfig]):
    """Quantize the float model in every mode the target runs (auto) or the one asked for.

    Every model built becomes a candidate; with ``auto`` the artifact must also be faster than the
    float model it started from, or nothing is written.
    """

    name = "quantize"
    stage = "quantize"
    config = QuantizeConfig

    def check(self, config: QuantizeConfig, profile: DeviceProfile, *, has_calib: bool) -> None:
        """A mode the profile cannot run, or static int8 without calibration data, fails before the export."""
        resolve_modes(config, profile, has_calib=has_calib)

    def run(self, state: ModelState, config: QuantizeConfig, ctx: PassContext) -> PassResult:
        """Resolve the modes for the profile, run the search, add its models as candidates."""
        modes = resolve_modes(
            config,
            ctx.profile,
            has_calib=ctx.calib is not None,
            has_linear_weights=has_linear_weights(state.model),
        )
        record: dict[str, Any] = {
            "mode": modes[0] if len(modes) == 1 else None,
            "modes": modes,
            "vnni": ctx.vnni,
        }
        must_beat = state.base if config.mode == "auto" else None
        if not modes:
            # Nothing to quantize in: the float model is the only candidate.
            floats = (state.base,) if state.base is not None else ()
            return PassResult(replace(state, candidates=state.candidates + floats), (), {"quantize": record})
        _refuse_quantized(state.model)
        pace = pace_for(ctx, must_beat.path if must_beat else None, QUICK_SLICE)
        search = QuantSearch(
            ctx.evaluator, ctx.calib, ctx.work, ctx.gate.max_drop, ctx.progress, ctx.clock, pace
        )
        if "int8-static" in modes and ctx.calib is not None:
            with ctx.clock.stage("quantize: find nodes kept float"):
                search.keep_float = float_by_rule(state.model, ctx.calib)
            if search.keep_float:
                record["float_by_rule"] = search.keep_float
        found = search.run(state.model, config, modes, ctx.profile, vnni=ctx.vnni)
        if found.notes:
            record["notes"] = found.notes
        new = replace(
            state,
            candidates=state.candidates + tuple(found.trials),
            notes={**state.notes, SEARCH_NOTE: (found, search)},
            must_beat=must_beat,
        )
        return PassResult(new, tuple(found.trials), {"quantize": record})

    def finish(self, record: dict[str, Any], chosen: Trial) -> dict[str, Any]:
        """The mode the artifact's model was quantized in."""
        mode = chosen.config.get("mode") if chosen.config else None
        return {"quantize": {**record["quantize"], "mode": mode}}


def _refuse_quantized(model: Path) -> None:
    """A model quantized already cannot be quantized again: ORT's quantizer breaks it or nests the scales."""
    found = quantized_ops(model)
    if found:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(found.items()))
        raise BadInputError(
            f"the model is quantized already ({ops}): there is nothing left to quantize",
            hint="pass the float model it was made from, or --quantize none to package this one as it is",
        )


def _best_config(trials: list[Trial]) -> QuantConfig | None:
    """The best-scoring config, preferring int8 weights and activations (what mixed precision can refine)."""
    scored = [t for t in trials if t.quality is not None and t.config]
    int8 = [t for t in scored if t.config and t.config.get("mode") in ("int8-static", "int8-dynamic")]
    pool = int8 or scored
    if not pool:
        return None
    return QuantConfig(**_config_args(max(pool, key=lambda t: t.quality.score if t.quality else -1.0).config))


def _finer_failed(config: QuantConfig, trials: list[Trial]) -> Trial | None:
    """For a per-tensor config, its per-channel twin when that one was scored and missed the budget."""
    if config.per_channel or config.mode not in ("int8-static", "int8-dynamic"):
        return None
    twin = config.with_(per_channel=True).to_dict()
    return next((t for t in trials if t.config == twin and t.quality is not None and not t.passed), None)


def _skipped(config: QuantConfig, other: Trial, note: str, why: str) -> Trial:
    """The row of a format candidate not built because ``other`` showed it cannot pass."""
    why = f"skipped: {other.name} {why} (drop {other.drop or 0.0:.4f})"
    return Trial(
        config.label(),
        "format",
        config=config.to_dict(),
        passed=False,
        note=f"{note}; {why}" if note else why,
    )


def _knobs(config: QuantConfig) -> str:
    text = config.calibration if config.mode == "int8-static" else ""
    return (text + (f" smooth{config.smooth_alpha:g}" if config.smooth_alpha else "")).strip() or "defaults"


def _config_args(config: dict[str, object] | None) -> dict[str, Any]:
    args = dict(config or {})
    for key in ("exclude", "keep_float"):
        args[key] = tuple(args.get(key, ()))  # type: ignore[arg-type]
    return args
