"""The compress pipeline: model in, evaluated and accuracy-gated artifact out.

load/export -> cleanup -> prune -> quantize search (+ mixed precision) -> time -> gate -> package.
Every intermediate model goes through the Evaluator and becomes a row of the trial table; a result
that misses the budget raises QualityGateError with that table and writes nothing.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgectl.compress.data import SampleSet, TensorInfo, read_samples, synthetic_samples
from edgectl.compress.errors import BadInputError, QualityGateError
from edgectl.compress.evaluate import Evaluator, Trial, measure_latency
from edgectl.compress.graph import load, model_stats, signature
from edgectl.compress.package import artifact_name, check_out_dir, write_artifact
from edgectl.compress.passes.cleanup import cleanup
from edgectl.compress.passes.prune import prune_structured, prune_unstructured
from edgectl.compress.passes.quantize import cpu_has_vnni
from edgectl.compress.passes.tensorrt import EngineResult, build_engine
from edgectl.compress.recipe import Recipe
from edgectl.compress.search import QuantSearch, resolve_mode
from edgectl.compress.source import acquire_float_model

Progress = Callable[[str], None]
# A short fine-tune after pruning: reads the pruned ONNX and calibration samples, writes the tuned ONNX.
FineTune = Callable[[Path, Path, SampleSet], None]
QUANTIZED_STAGES = ("format", "calibration", "mixed-precision")


@dataclass(frozen=True)
class CompressRequest:
    """Everything one ``edgectl compress`` run needs."""

    model: str
    out_dir: Path
    profile: str = "x86-cpu-vnni"
    recipe: Recipe = field(default_factory=Recipe.from_options)
    calib: Path | None = None
    eval: Path | None = None
    max_drop: float = 0.01
    name: str | None = None
    version: int = 1
    parent_version: int | None = None
    sign_key: Path | None = None
    state_dict: Path | None = None
    latency_rounds: int = 7
    module: Any = None  # a torch.nn.Module given through the Python API instead of ``model``
    example: dict[str, np.ndarray] | None = None  # its sample inputs when no npz is given
    finetune: FineTune | None = None  # runs after structured pruning (bias recalibration runs always)


@dataclass
class CompressResult:
    """The artifact written, the baseline and chosen rows, and every trial."""

    out_dir: Path
    digest: str
    baseline: Trial
    chosen: Trial
    trials: list[Trial]
    metrics: dict[str, Any]
    seconds: float

    @property
    def rows(self) -> list[dict[str, object]]:
        """The comparison table, one JSON-ready row per model tried (the baseline first)."""
        return [t.as_dict() for t in self.trials]


def _profile(name: str) -> Any:
    from edgectl.devices import load_profile

    return load_profile(name)


def _stats(trial: Trial, feed: dict[str, np.ndarray]) -> None:
    if trial.path is not None:
        stats = model_stats(trial.path, feed)
        trial.size_bytes, trial.params = stats.size_bytes, stats.params
        trial.macs = trial.macs if trial.macs is not None else stats.macs


def run(req: CompressRequest, progress: Progress = lambda _msg: None) -> CompressResult:
    """Run the whole pipeline for ``req``; raises an EdgectlError subclass on any failure."""
    started = time.perf_counter()
    if req.max_drop < 0:
        raise BadInputError(
            f"--max-drop must be >= 0, got {req.max_drop}", hint="e.g. --max-drop 0.005 for half a point"
        )
    check_out_dir(req.out_dir)
    profile = _profile(req.profile)
    with tempfile.TemporaryDirectory(prefix="edgectl-compress-") as tmp:
        work = Path(tmp)
        float_path, source_sha, export_info = acquire_float_model(
            req.model,
            work,
            progress,
            module=req.module,
            example=req.example,
            calib=req.calib,
            eval_set=req.eval,
            state_dict=req.state_dict,
        )
        inputs, outputs = signature(load(float_path))
        calib = read_samples(req.calib, inputs, what="calibration") if req.calib else None
        if req.eval is not None:
            data = read_samples(req.eval, inputs, what="evaluation")
        else:
            data = calib or synthetic_samples(inputs, 32)
        progress("scoring the float model")
        evaluator = Evaluator(float_path, data)
        feed = data.feed(0)
        baseline = Trial(
            "float (baseline)", "baseline", float_path, quality=evaluator.baseline, drop=0.0, passed=True
        )
        trials = [baseline]
        record: dict[str, Any] = {"recipe": req.recipe.to_dict(), "export": export_info}
        current = float_path
        if req.recipe.get("cleanup") is not None:
            progress("cleaning up the graph")
            clean = work / "clean.onnx"
            clean_cfg = req.recipe.get("cleanup")
            if req.recipe.get("tensorrt") is not None:
                clean_cfg = dataclasses.replace(clean_cfg, fuse_transformer=False)
            record["cleanup"] = cleanup(current, clean, clean_cfg).as_dict()
            current = clean
        prune_cfg = req.recipe.get("prune")
        if prune_cfg is not None and prune_cfg.ratio > 0:
            progress(f"pruning {prune_cfg.ratio:.0%} of channels")
            pruned = work / "pruned.onnx"
            if prune_cfg.kind == "unstructured":
                n = prune_unstructured(
                    current,
                    pruned,
                    prune_cfg,
                    profile_name=profile.name,
                    sparse_2_4=profile.sparsity.structured_2_4,
                )
                record["prune"] = {"kind": "2:4", "tensors": n}
            else:
                record["prune"] = prune_structured(current, pruned, prune_cfg, calib or data).as_dict()
            t = Trial(f"pruned {prune_cfg.ratio:.0%}", "prune", pruned, config=dict(prune_cfg.__dict__))
            t.quality = evaluator.quality(pruned)
            t.drop = t.quality.drop_from(evaluator.baseline)
            t.passed = t.drop <= req.max_drop + 1e-12
            trials.append(t)
            current = pruned
            if req.finetune is not None:
                progress("fine-tuning the pruned model on calibration data")
                tuned = work / "finetuned.onnx"
                req.finetune(pruned, tuned, calib or data)
                load(tuned)  # the hook must leave a readable model behind
                t = Trial(f"pruned {prune_cfg.ratio:.0%} + fine-tuned", "prune", tuned)
                t.quality = evaluator.quality(tuned)
                t.drop = t.quality.drop_from(evaluator.baseline)
                t.passed = t.drop <= req.max_drop + 1e-12
                trials.append(t)
                record["finetune"] = {"hook": getattr(req.finetune, "__qualname__", repr(req.finetune))}
                current = tuned
        search = QuantSearch(evaluator, calib, work, req.max_drop, progress)
        step = req.recipe.get("quantize")
        mode = resolve_mode(step, profile, has_calib=calib is not None) if step is not None else None
        base_trial = trials[-1]
        if current is not float_path and base_trial is baseline:
            base_trial = Trial("cleaned float", "cleanup", current)
            base_trial.quality = evaluator.quality(current)
            base_trial.drop = base_trial.quality.drop_from(evaluator.baseline)
            base_trial.passed = base_trial.drop <= req.max_drop + 1e-12
            trials.append(base_trial)
        mp_info: dict[str, Any] = {}
        if mode is not None:
            found = search.run(
                current, step, mode, profile, req.recipe.get("mixed_precision"), vnni=cpu_has_vnni()
            )
            trials += found.trials
            mp_info = {
                "excluded": found.excluded,
                "ranking": [s.as_dict() for s in found.ranking[: max(10, len(found.excluded))]],
                "reason": (
                    f"kept the {len(found.excluded)} most sensitive node(s) in float to meet "
                    f"max_drop={req.max_drop}"
                )
                if found.excluded
                else "",
                "notes": found.notes,
            }
        record["quantize"] = {"mode": mode, "vnni": cpu_has_vnni()}
        if mp_info:
            record["mixed_precision"] = mp_info
        # Time the baseline and every passing model together: same thread count, interleaved rounds.
        timed = [(t, t.path) for t in trials if t.path is not None and (t.passed or t is baseline)]
        progress(f"timing {len(timed)} models (1 thread, interleaved)")
        for (t, _), lat in zip(
            timed, measure_latency([p for _, p in timed], feed, rounds=req.latency_rounds), strict=True
        ):
            t.latency = lat
        macs_after_prune = model_stats(current, feed).macs
        for t in trials:
            if t.path is not None:
                t.macs = model_stats(float_path, feed).macs if t is baseline else macs_after_prune
                _stats(t, feed)
        if mode is not None:
            final_candidates = [t for t in trials if t.passed and t.stage in QUANTIZED_STAGES]
            if step.mode == "auto" and base_trial.passed:
                # Quantization that makes this model slower on this EP is no win: the float base competes.
                final_candidates.append(base_trial)
        else:
            final_candidates = [trials[-1]] if trials[-1].passed else []
        if not final_candidates:
            scored = [
                t for t in trials if t.quality is not None and (mode is None or t.stage in QUANTIZED_STAGES)
            ]
            best = max(scored, key=lambda t: t.quality.score if t.quality else 0.0, default=None)
            what = (
                f"best drop {best.drop:.4f} ({best.name})"
                if best and best.drop is not None
                else "nothing built"
            )
            raise QualityGateError(
                f"no candidate met --max-drop {req.max_drop} ({evaluator.metric}); {what}; no artifact written",
                hint="raise --max-drop, pass better --calib data, prune less, or use --quantize none",
                trials=[t.as_dict() for t in trials],
            )
        chosen = _choose(final_candidates)
        chosen.note = (chosen.note + "; " if chosen.note else "") + "chosen"
        engine = _engine(req, profile, chosen, work, progress)
        record["tensorrt"] = engine.as_dict()
        record["chosen"] = chosen.config
        if mp_info and chosen.config:
            # The fastest passing model may keep more nodes float than the fewest that passed.
            excluded = list(chosen.config.get("exclude", []))  # type: ignore[call-overload]
            mp_info["excluded"] = excluded
            mp_info["reason"] = (
                f"kept the {len(excluded)} most sensitive node(s) in float to meet max_drop={req.max_drop}"
                if excluded
                else ""
            )
        metrics = _metrics(baseline, chosen, trials, evaluator, data, req, time.perf_counter() - started)
        progress("writing the artifact")
        artifact = write_artifact(
            req.out_dir,
            model=chosen.path,  # type: ignore[arg-type]
            name=artifact_name(req.name or Path(req.model.split(":")[0]).stem),
            version=req.version,
            inputs=inputs,
            outputs=outputs,
            golden_feed=feed,
            recipe=record,
            profile=profile.name,
            metrics=metrics,
            source_sha256=source_sha,
            quantized=chosen.stage in QUANTIZED_STAGES,
            engine=engine.path,
            engine_target=None
            if engine.path is None
            else {
                "tensorrt_version": engine.tensorrt_version or "",
                "compute_capability": engine.compute_capability or "",
            },
            parent_version=req.parent_version,
            sign_key=req.sign_key,
        )
        for t in trials:
            t.path = None  # the temporary folder is about to go
        return CompressResult(
            req.out_dir, artifact.digest, baseline, chosen, trials, metrics, time.perf_counter() - started
        )


def _choose(passing: list[Trial], tie: float = 0.03) -> Trial:
    """The fastest passing model; within ``tie`` (timing noise) of it, the smallest file wins."""
    fastest = min(t.latency.p50_ms for t in passing if t.latency) if any(t.latency for t in passing) else None
    if fastest is None:
        return passing[0]
    close = [t for t in passing if t.latency and t.latency.p50_ms <= fastest * (1 + tie)]
    return min(close, key=lambda t: (t.size_bytes or 0, t.latency.p50_ms if t.latency else 0.0))


def _engine(
    req: CompressRequest, profile: Any, chosen: Trial, work: Path, progress: Progress
) -> EngineResult:
    cfg = req.recipe.get("tensorrt")
    if cfg is None:
        if profile.engine.tensorrt:
            return EngineResult(None, None, None, True, "the recipe builds no engine: build it on the device")
        return EngineResult(None, None, None, False, f"{profile.name} does not use TensorRT")
    progress("building the TensorRT engine")
    is_int8 = bool(chosen.config and str(chosen.config.get("mode", "")).startswith("int8"))
    return build_engine(chosen.path, work / "model.engine", cfg, int8=is_int8)  # type: ignore[arg-type]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 4)


def _metrics(
    baseline: Trial,
    chosen: Trial,
    trials: list[Trial],
    ev: Evaluator,
    data: SampleSet,
    req: CompressRequest,
    seconds: float,
) -> dict[str, Any]:
    import platform

    assert baseline.quality and chosen.quality
    b_lat, c_lat = baseline.latency, chosen.latency
    floats = [t.latency.p50_ms for t in trials if t.latency and t.stage in ("baseline", "cleanup")]
    best_float = min(floats, default=None)
    return {
        # The artifact format's well-known keys first (flat numbers), then the details.
        "quality_metric": ev.metric,
        "baseline_quality": round(baseline.quality.score, 6),
        "compressed_quality": round(chosen.quality.score, 6),
        "quality_drop": round(chosen.drop or 0.0, 6),
        "max_drop": req.max_drop,
        "min_cosine": round(chosen.quality.min_cosine, 6),
        "eval_samples": data.count,
        "eval_data": data.source,
        "baseline_latency_ms": b_lat.p50_ms if b_lat else None,
        "latency_ms": c_lat.p50_ms if c_lat else None,
        "baseline_latency_p90_ms": b_lat.p90_ms if b_lat else None,
        "latency_p90_ms": c_lat.p90_ms if c_lat else None,
        "speedup": _ratio(b_lat.p50_ms if b_lat else None, c_lat.p50_ms if c_lat else None),
        # Like for like: the float graph after the same clean-up the compressed model had, when faster.
        "speedup_vs_best_float": _ratio(best_float, c_lat.p50_ms if c_lat else None),
        "latency_measured_on": f"CPUExecutionProvider, intra_op_num_threads=1, batch 1, interleaved, "
        f"{platform.machine()}{' VNNI' if cpu_has_vnni() else ''}",
        "baseline_size_bytes": baseline.size_bytes,
        "size_bytes": chosen.size_bytes,
        "size_ratio": _ratio(baseline.size_bytes, chosen.size_bytes),
        "baseline_macs": baseline.macs,
        "macs": chosen.macs,
        "baseline_params": baseline.params,
        "params": chosen.params,
        "trials": [t.as_dict() for t in trials],
        "time_to_artifact_s": round(seconds, 2),
    }


def signature_of(model: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of an ONNX file (for callers preparing npz files)."""
    return signature(load(model))


def compress_module(
    module: Any,
    out_dir: Path,
    *,
    profile: str = "x86-cpu-vnni",
    sign_key: Path | None = None,
    calib: Path | None = None,
    eval: Path | None = None,
    example: dict[str, np.ndarray] | None = None,
    max_drop: float = 0.01,
    recipe: Recipe | None = None,
    name: str | None = None,
    version: int = 1,
    parent_version: int | None = None,
    finetune: FineTune | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Python API: compress a ``torch.nn.Module`` into a signed artifact in ``out_dir``.

    Sample inputs come from ``calib``/``eval`` (.npz named after forward()'s parameters) or
    ``example``; ``finetune`` runs after pruning. Raises QualityGateError (nothing written) when no
    candidate meets ``max_drop``; returns the artifact folder, the chosen row and every row tried.
    """
    label = name or type(module).__name__
    request = CompressRequest(
        model=label, out_dir=Path(out_dir), profile=profile, recipe=recipe or Recipe.from_options(),
        calib=calib, eval=eval, max_drop=max_drop, name=label, version=version,
        parent_version=parent_version, sign_key=sign_key, module=module, example=example, finetune=finetune,
    )  # fmt: skip
    return run(request, progress or (lambda _msg: None))
