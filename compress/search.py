"""The quantization search: build candidates, score each, widen the search only when the budget is missed.

Order of escalation: format/type candidates (whose speed depends on the execution provider, so
they are timed later), then calibration and granularity variants of the best one, then
sensitivity-guided mixed precision. Every model built is a Trial in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError
from edgectl.compress.evaluate import Evaluator, Trial
from edgectl.compress.passes.mixed_precision import (
    MixedPrecisionConfig,
    NodeSensitivity,
    exclusion_steps,
    float_candidates,
    rank_nodes,
)
from edgectl.compress.passes.quantize import (
    QuantConfig,
    QuantMode,
    latency_candidates,
    ort_default,
    quality_variants,
    quantize,
)
from edgectl.compress.recipe import QuantizeStep

Progress = Callable[[str], None]


@dataclass
class SearchResult:
    """Every quantized trial, and the sensitivity ranking with the nodes kept in float (if any)."""

    trials: list[Trial] = field(default_factory=list)
    mode: str = "none"
    ranking: list[NodeSensitivity] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def resolve_mode(step: QuantizeStep, profile: Any, *, has_calib: bool) -> QuantMode | None:
    """The concrete mode for ``step.mode`` on ``profile``; refuses modes the device cannot run."""
    int8_cpu = "CPUExecutionProvider" in profile.providers_for("int8")
    if step.mode == "none":
        return None
    if step.mode == "auto":
        if profile.supports("int8") and (has_calib or int8_cpu):
            return "int8-static" if has_calib else "int8-dynamic"
        return "fp16" if profile.supports("fp16") else None
    if step.mode in ("int8-static", "int8-dynamic") and not profile.supports("int8"):
        raise BadInputError(f"profile {profile.name} has no execution provider that runs int8")
    if step.mode == "int8-dynamic" and not int8_cpu:
        raise BadInputError(
            f"dynamic int8 needs ORT's CPU EP, but {profile.name} runs int8 only on "
            f"{', '.join(profile.providers_for('int8'))}",
            hint="use --quantize int8-static with --calib",
        )
    if step.mode == "fp16" and not profile.supports("fp16"):
        raise BadInputError(
            f"profile {profile.name} has no execution provider with fp16 kernels (ORT's CPU EP would "
            "insert casts and run slower than fp32)",
            hint="use --quantize int8-static or int8-dynamic for CPU targets",
        )
    if step.mode == "int8-static" and not has_calib:
        raise BadInputError("--quantize int8-static needs calibration data", hint="pass --calib FILE.npz")
    return step.mode  # type: ignore[return-value]


def _hint(profile: Any, mode: QuantMode) -> QuantConfig:
    q = profile.quantization
    fmt: Literal["QDQ", "QOperator"] = "QDQ" if q.format == "qdq" else "QOperator"
    if mode == "int8-dynamic":
        return QuantConfig(mode, "QOperator", "u8", q.weight_type, q.per_channel, q.reduce_range)
    return QuantConfig(mode, fmt, q.activation_type, q.weight_type, q.per_channel, q.reduce_range)


def candidates(step: QuantizeStep, mode: QuantMode, profile: Any, *, vnni: bool) -> list[QuantConfig]:
    """The first round: the profile's hint, the measured alternatives, and ORT's defaults for reference."""
    first = _hint(profile, mode)
    if mode == "fp16":
        return [QuantConfig("fp16")]
    more = latency_candidates(mode, vnni=vnni) if step.search else []
    if "CPUExecutionProvider" not in profile.providers_for("int8"):
        more = []  # TensorRT reads only symmetric s8 QDQ: CPU timings of other formats mean nothing there
    else:
        more.append(ort_default(mode))
    calib = "minmax" if step.calibration == "auto" else step.calibration
    out: list[QuantConfig] = []
    for c in [first, *more]:
        c = c.with_(calibration=calib, calib_samples=step.calib_samples)
        if c not in out:
            out.append(c)
    return out


class QuantSearch:
    """Runs the escalating search for one base model against one evaluator and budget."""

    def __init__(
        self, evaluator: Evaluator, calib: SampleSet | None, work: Path, max_drop: float, progress: Progress
    ) -> None:
        self.evaluator = evaluator
        self.calib = calib
        self.work = work
        self.max_drop = max_drop
        self.progress = progress
        self._count = 0

    def trial(self, base: Path, config: QuantConfig, stage: str, note: str = "") -> Trial:
        """Quantize ``base`` per ``config`` and score it."""
        self._count += 1
        out = self.work / f"candidate{self._count}.onnx"
        self.progress(f"{stage}: {config.label()}")
        trial = Trial(config.label(), stage, config=config.as_dict(), note=note)
        try:
            # Dynamic quantization needs no calibration, but SmoothQuant does: fall back to the eval samples.
            quantize(base, out, config, self.calib or (self.evaluator.data if config.smooth_alpha else None))
            trial.quality = self.evaluator.quality(out)
        except BadInputError:
            raise
        except Exception as exc:  # a candidate the quantizer or ORT rejects is a failed row, not a crash
            trial.passed = False
            trial.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return trial
        trial.path = out
        trial.size_bytes = out.stat().st_size
        trial.drop = trial.quality.drop_from(self.evaluator.baseline)
        trial.passed = trial.drop <= self.max_drop + 1e-12
        return trial

    def run(
        self,
        base: Path,
        step: QuantizeStep,
        mode: QuantMode,
        profile: Any,
        mp: MixedPrecisionConfig | None,
        *,
        vnni: bool,
    ) -> SearchResult:
        """All trials for ``base``; the caller times the passing ones and keeps the fastest."""
        result = SearchResult(mode=mode)
        first = candidates(step, mode, profile, vnni=vnni)
        for config in first:
            note = (
                "ORT defaults" if config == ort_default(mode).with_(calib_samples=step.calib_samples) else ""
            )
            result.trials.append(self.trial(base, config, "format", note))
        if any(t.passed for t in result.trials):
            return result
        scored = [t for t in result.trials if t.quality is not None]
        if not scored:
            result.notes.append("no quantized candidate could be built")
            return result
        best_trial = max(scored, key=lambda t: t.quality.score if t.quality else -1.0)
        best = QuantConfig(**_config_args(best_trial.config))
        if step.search:
            model = onnx.load(str(base), load_external_data=False)
            consts = {i.name for i in model.graph.initializer}
            has_matmul = any(n.op_type == "MatMul" and n.input[1] in consts for n in model.graph.node)
            for variant in quality_variants(best, has_matmul=has_matmul):
                if step.calibration != "auto" and variant.calibration != best.calibration:
                    continue
                t = self.trial(base, variant, "calibration")
                result.trials.append(t)
                if t.passed:
                    self._formats_with(base, first, variant, result)
                    return result
                if t.quality and best_trial.quality and t.quality.score > best_trial.quality.score:
                    best_trial, best = t, variant
        if mp is None or mode == "fp16":  # the ranking simulates int8
            return result
        self.progress("ranking nodes by sensitivity")
        data = self.calib or self.evaluator.data
        result.ranking = rank_nodes(base, data, best, samples=mp.samples)
        pool = float_candidates(result.ranking, mp)
        steps = [k for k in exclusion_steps(result.ranking, mp) if k < len(pool)] + [len(pool)]
        steps = sorted(set(steps)) if pool else []
        failed, passed_at = 0, None
        for k in steps:
            t = self._float_trial(base, best, pool[:k], result)
            if t.passed:
                passed_at = k
                break
            failed = k
        # Between the last k that failed and the first that passed, bisect for the fewest float nodes.
        while passed_at is not None and passed_at - failed > 1:
            mid = (failed + passed_at) // 2
            if self._float_trial(base, best, pool[:mid], result).passed:
                passed_at = mid
            else:
                failed = mid
        if passed_at is not None:
            result.excluded = [s.node for s in pool[:passed_at]]
        return result

    def _formats_with(
        self, base: Path, first: list[QuantConfig], passed: QuantConfig, result: SearchResult
    ) -> None:
        """Every format/type candidate again with the calibration and smoothing that passed.

        Which format is fastest depends on the EP and the CPU, not on the quality knobs: without this
        the first format that passes after smoothing would win unmeasured.
        """
        seen = {QuantConfig(**_config_args(t.config)) for t in result.trials if t.config}
        for config in first:
            c = config.with_(calibration=passed.calibration, smooth_alpha=passed.smooth_alpha)
            if passed.smooth_alpha:  # smoothing moves outliers into weight rows: per-tensor weights lose them
                c = c.with_(per_channel=True)
            if c not in seen:
                seen.add(c)
                result.trials.append(self.trial(base, c, "format", f"with {_knobs(passed)}"))

    def _float_trial(
        self, base: Path, best: QuantConfig, keep: list[NodeSensitivity], result: SearchResult
    ) -> Trial:
        names = tuple(s.node for s in keep)
        t = self.trial(
            base, best.with_(exclude=names), "mixed-precision", f"worst {len(names)} node(s) kept float"
        )
        result.trials.append(t)
        return t


def _knobs(config: QuantConfig) -> str:
    text = config.calibration if config.mode == "int8-static" else ""
    return (text + (f" smooth{config.smooth_alpha:g}" if config.smooth_alpha else "")).strip() or "defaults"


def _config_args(config: dict[str, object] | None) -> dict[str, Any]:
    args = dict(config or {})
    args["exclude"] = tuple(args.get("exclude", ()))  # type: ignore[arg-type]
    return args
