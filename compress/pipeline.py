"""The compress pipeline: model in, evaluated and accuracy-gated artifact out.

Named stages: acquire (load/export, score the float model) -> float passes (clean-up, pruning) ->
quantize passes (the search, mixed precision) -> time and choose -> target passes (engines) ->
package. Which passes run, with what config, is the recipe's business; the pipeline knows no pass.
Every model built goes through the Evaluator and the QualityGate and becomes a row of the trial
table; a result that misses the budget raises QualityGateError with that table and writes nothing.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgectl.artifact import TensorSpec, summarize_inputs
from edgectl.compress.choice import (
    FLOAT_HINT,
    fastest_passing,
    nothing_passed,
    off_target_note,
    timing_providers,
)
from edgectl.compress.clock import StageClock
from edgectl.compress.data import read_samples, synthetic_samples
from edgectl.compress.errors import BadInputError, QualityGateError
from edgectl.compress.evaluate import SPEEDUP_MARGIN, Evaluator, QualityGate, Trial
from edgectl.compress.graph import load, model_params, model_stats, signature
from edgectl.compress.metrics import check_metric_spec, parse_metric
from edgectl.compress.outcome import artifact_metrics
from edgectl.compress.package import artifact_name, check_out_dir, check_versions, write_artifact
from edgectl.compress.passes.base import (
    CompressPass,
    FineTune,
    ModelState,
    PassContext,
    Progress,
    Stage,
    Timer,
)
from edgectl.compress.passes.tensorrt import EngineResult
from edgectl.compress.quantizer import cpu_has_vnni
from edgectl.compress.recipe import Recipe
from edgectl.compress.source import acquire_float_model
from edgectl.devices import DeviceProfile, load_profile


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
    metric: str | None = None  # --metric: top1 | cosine | masked-cosine:INPUT | module:function
    timer: Timer | None = None  # replaces the latency measurement (tests make a model "slower" with it)
    train: Path | None = None  # --train: samples (+ labels) that recover accuracy after pruning a torch model


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
    notes: list[str] = field(default_factory=list)  # how the inputs were read, for the user
    stages: list[dict[str, object]] = field(
        default_factory=list
    )  # wall/CPU seconds per stage (the report's breakdown)

    @property
    def rows(self) -> list[dict[str, object]]:
        """The comparison table, one JSON-ready row per model tried (the baseline first)."""
        return [t.to_dict() for t in self.trials]


def run(req: CompressRequest, progress: Progress = lambda _msg: None) -> CompressResult:
    """Run the whole pipeline for ``req``; raises an EdgectlError subclass on any failure."""
    started = time.perf_counter()
    if not 0 <= req.max_drop < float("inf"):  # NaN failed every gate after the run; inf, the manifest
        raise BadInputError(
            f"--max-drop must be >= 0 and finite, got {req.max_drop}",
            hint="e.g. --max-drop 0.005 for half a point",
        )
    check_out_dir(req.out_dir)
    check_versions(req.version, req.parent_version)
    check_metric_spec(req.metric)
    if req.train is not None and req.recipe.get("prune") is None:
        raise BadInputError(
            "--train recovers accuracy after pruning, and nothing is pruned",
            hint="add --prune 0.5 (or auto), or drop --train",
        )
    profile = load_profile(req.profile)
    for kind, config in req.recipe.passes():
        kind.check(config, profile, has_calib=req.calib is not None)
    with tempfile.TemporaryDirectory(prefix="edgectl-compress-") as tmp:
        staged = _Run(req, profile, Path(tmp), progress)
        try:
            state = staged.run_stage("float", staged.start())
            state = staged.run_stage("quantize", staged.settle_float(state))
            state = staged.run_stage("target", staged.choose(state))
        except QualityGateError as exc:
            exc.notes = staged.notes  # how the inputs were read matters most when nothing passed
            raise
        return staged.package(state, started)


class _Run:
    """One pipeline run: acquire -> float passes -> quantize passes -> time and choose -> target passes -> package."""

    def __init__(self, req: CompressRequest, profile: DeviceProfile, work: Path, progress: Progress) -> None:
        self.req, self.profile, self.work, self.progress = req, profile, work, progress
        self.trials: list[Trial] = []
        self.record: dict[str, Any] = {"recipe": req.recipe.to_dict()}
        self.ran: list[CompressPass[Any]] = []
        self.clock = StageClock()
        self.notes: list[str] = []

    def start(self) -> ModelState:
        """Acquire the float model and its data, score it: the baseline row and the passes' context."""
        req, work = self.req, self.work
        clock = self.clock
        with clock.stage("acquire (load or export)"):
            source = acquire_float_model(
                req.model, work, self.progress, module=req.module, example=req.example, calib=req.calib,
                eval_set=req.eval, state_dict=req.state_dict,
            )  # fmt: skip
        self.float_path, self.source_sha = source.path, source.source_sha256
        self.record["export"] = source.info
        self.inputs, self.outputs = signature(load(self.float_path))
        calib = read_samples(req.calib, self.inputs, what="calibration") if req.calib else None
        # What agents compare live inputs against (drift); only real calibration data qualifies.
        self.input_summary = summarize_inputs(calib.inputs) if calib else None
        if req.eval is not None:
            self.data = read_samples(req.eval, self.inputs, what="evaluation")
        else:
            self.data = calib or synthetic_samples(self.inputs, 32)
        # Training runs in torch, where a batch size the ONNX export fixed does not apply.
        train = read_samples(req.train, self.inputs, what="training", any_count=True) if req.train else None
        if train is not None and train.labels is None:
            self.progress("training data has no labels: recovery distils the float model's outputs only")
        self.notes = sorted({d.note for d in (calib, self.data, train) if d is not None and d.note})
        providers, on_target = timing_providers(self.profile)
        if not on_target:
            self.notes.append(off_target_note(self.profile, providers))
        if self.notes:
            self.record["notes"] = self.notes
        metric = parse_metric(
            req.metric, input_names=[i.name for i in self.inputs], has_labels=self.data.labels is not None
        )
        self.progress("scoring the float model")
        with clock.stage("float reference outputs"):
            evaluator = Evaluator(self.float_path, self.data, metric=metric)
        self.ctx = PassContext(
            work, self.profile, evaluator, QualityGate(req.max_drop), calib, cpu_has_vnni(), self.progress,
            req.finetune, req.timer, providers, on_target, req.latency_rounds, train, source.module, clock,
        )  # fmt: skip
        self.baseline = Trial(
            "float (baseline)", "baseline", self.float_path, quality=evaluator.baseline, drop=0.0, passed=True
        )
        self.trials.append(self.baseline)
        return ModelState(self.float_path, self.baseline)

    def run_stage(self, stage: Stage, state: ModelState) -> ModelState:
        """Every pass of ``stage`` in recipe order, each on the state the one before left."""
        for kind, config in self.req.recipe.passes():
            if kind.stage == stage:
                with self.clock.stage(f"{kind.name} pass"):
                    result = kind.run(state, config, self.ctx)
                state = result.state
                self.trials += result.trials
                self.record.update(result.record)
                untrained = result.record.get("recovery", {}).get("reason")
                if untrained:  # a progress line vanishes under the spinner: --train not used is a note
                    self.notes.append(f"--train: {untrained}")
                    self.record["notes"] = self.notes
                self.ran.append(kind)
        return state

    def settle_float(self, state: ModelState) -> ModelState:
        """Score the float model the quantize stage starts from; without a quantize pass it is the only candidate."""
        if state.base is None:
            with self.clock.stage("score cleaned float"):
                self.trials.append(self.ctx.judge(Trial("cleaned float", "cleanup", state.model)))
            state = dataclasses.replace(state, base=self.trials[-1])
        self.float_trials = list(self.trials)
        passes = [kind for kind, _ in self.req.recipe.passes()]
        pruned = any(kind.name == "prune" for kind in passes) and state.base is not self.baseline
        if pruned and state.base is not None and state.base.passed is False:
            # Quantizing adds error to what pruning lost: a dozen int8 models built on a pruned model
            # that already misses the budget cannot pass, and the refusal would name one of them.
            raise QualityGateError(
                f"the pruned float model already misses --max-drop {self.req.max_drop} "
                f"({self.ctx.evaluator.metric}: drop {state.base.drop:.4f}, {state.base.name}); nothing was "
                "quantized on top of it; no artifact written",
                hint=f"prune less, {_recovery_hint(self.req.train is not None, self.ctx.torch_model is not None)}, "
                "use --prune auto, or raise --max-drop",
                trials=[t.to_dict() for t in self.trials],
            )
        only_cleanup = all(kind.name == "cleanup" for kind in passes if kind.stage == "float")
        if not any(kind.stage == "quantize" for kind in passes) and state.base:
            candidates: tuple[Trial, ...] = (state.base,)
            if self.ctx.on_target and state.base.path != self.baseline.path and only_cleanup:
                # The clean-up was kept on one measurement; the final timing on the target decides
                # again, so a clean-up that timed slower there ships the model as it was given.
                candidates += (self.baseline,)
            state = dataclasses.replace(state, candidates=candidates)
        elif not only_cleanup and state.base and state.base.path != self.baseline.path:
            # A pruned (or the user's own) float model is what they asked for: when no quantized
            # model beats it, it is the artifact, as long as it beats the float model as given.
            state = dataclasses.replace(state, candidates=(*state.candidates, state.base))
        return state

    def choose(self, state: ModelState) -> ModelState:
        """Time the baseline and every passing model, then keep the fastest passing candidate."""
        feed = self.data.feed(0)
        timed = [
            t
            for t in self.trials
            if t.path is not None and (t.passed or t is self.baseline or t is state.must_beat)
        ]
        self.progress(f"timing {len(timed)} models (1 thread, interleaved)")
        # The baseline and the model to beat are references (timed every round); the others race.
        racing = [t is not self.baseline and t is not state.must_beat for t in timed]
        with self.clock.stage("time candidates"):
            for t, lat in zip(timed, self.ctx.time([t.path for t in timed if t.path], racing), strict=True):
                t.latency = lat
                if lat.stopped_early:
                    early = f"timed {lat.runs} runs: clearly slower than the fastest, stopped early"
                    t.note = f"{t.note}; {early}" if t.note else early
        with self.clock.stage("model stats"):
            self._stats(state, feed)
        passing = [t for t in state.candidates if t.passed]
        if not passing:
            raise nothing_passed(state.candidates, state.must_beat is not None, self.req.max_drop,
                                 self.ctx.evaluator.metric, self.profile.name, [t.to_dict() for t in self.trials])  # fmt: skip
        passing = self._faster_than_float(state, passing)
        chosen = fastest_passing(passing)
        chosen.note = (chosen.note + "; " if chosen.note else "") + "chosen"
        return dataclasses.replace(state, chosen=chosen)

    def _stats(self, state: ModelState, feed: dict[str, np.ndarray]) -> None:
        """Size and parameters of every row; MACs of the float model and of the graph the quantize stage
        started from (quantization keeps a graph's MACs, so the rows share it: counted twice, not per row)."""
        float_macs = model_stats(self.float_path, feed).macs
        macs_after_float_passes = (
            float_macs if state.model == self.float_path else model_stats(state.model, feed).macs
        )
        for t in self.trials:
            if t.path is not None:
                t.size_bytes = t.path.stat().st_size
                t.params = model_params(t.path) if t.latency or t is state.chosen else None
                t.macs = float_macs if t is self.baseline else macs_after_float_passes

    def _faster_than_float(self, state: ModelState, passing: list[Trial]) -> list[Trial]:
        """Where a pass promised a speed-up (auto), only candidates faster than the float model remain."""
        floor = state.must_beat
        if floor is None or not self.ctx.on_target:
            return passing  # timings off the target's EP prove nothing about the target
        refs = [t for t in (floor, self.baseline) if t.latency]

        def ratios(t: Trial) -> list[tuple[float, float]]:  # (mine, theirs) per reference, rounds paired
            return [t.latency.paired_ms(r.latency) for r in refs if t.latency and r.latency and r is not t]

        faster = [
            t for t in passing if t.latency and all(m < th * (1 - SPEEDUP_MARGIN) for m, th in ratios(t))
        ]
        if faster:
            return faster
        # The closest call: each candidate against the reference it came nearest to failing.
        worst = [(t, max(ratios(t), key=lambda p: p[0] / max(p[1], 1e-12))) for t in passing if ratios(t)]
        best, (mine, theirs) = min(worst, key=lambda w: w[1][0] / max(w[1][1], 1e-12))
        raise QualityGateError(
            f"no quantized model inside --max-drop {self.req.max_drop} is faster than the float model on "
            f"{self.profile.name} (by more than {SPEEDUP_MARGIN:.0%}: float {theirs:.4f} ms, fastest passing "
            f"{best.name} {mine:.4f} ms, timed together); no artifact written",
            hint=FLOAT_HINT,
            trials=[t.to_dict() for t in self.trials],
        )

    def package(self, state: ModelState, started: float) -> CompressResult:
        """Finish every pass's record for the chosen model, then write the signed artifact."""
        chosen = state.chosen
        assert chosen is not None and chosen.path is not None
        for kind in self.ran:
            self.record.update(kind.finish(self.record, chosen))
        self.record.setdefault("tensorrt", EngineResult.not_in_recipe(self.profile).to_dict())
        self.record["chosen"] = chosen.config
        req = self.req
        metrics = artifact_metrics(
            self.baseline,
            chosen,
            self.trials,
            self.ctx.evaluator,
            self.data,
            req.max_drop,
            time.perf_counter() - started,
            self.ctx.providers,
        )
        # The manifest's breakdown ends here; the report's also has the writing.
        metrics["stage_seconds"] = self.clock.to_list()
        self.progress("writing the artifact")
        with self.clock.stage("write and sign artifact"):
            artifact = write_artifact(
                req.out_dir, model=chosen.path, name=artifact_name(req.name or Path(req.model.split(":")[0]).stem),
                version=req.version, inputs=self.inputs, outputs=self.outputs, golden_feed=self.data.feed(0),
                recipe=self.record, profile=self.profile.name, metrics=metrics, source_sha256=self.source_sha,
                quantized=chosen not in self.float_trials, files=state.files, engines=state.engines,
                parent_version=req.parent_version, sign_key=req.sign_key, input_summary=self.input_summary,
            )  # fmt: skip
        for t in self.trials:
            t.path = None  # the temporary folder is about to go
        return CompressResult(
            req.out_dir,
            artifact.digest,
            self.baseline,
            chosen,
            self.trials,
            metrics,
            time.perf_counter() - started,
            self.notes,
            self.clock.to_list(),
        )


def _recovery_hint(train: bool, torch_model: bool) -> str:
    """What recovers a pruned model's accuracy from here: --train, more epochs, or a PyTorch model."""
    if train:
        return (
            "raise --finetune-epochs" if torch_model else "pass a .pt2 or package.module:factory for --train"
        )
    return "add --train FILE.npz to recover accuracy (torch models)"


def signature_of(model: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file (for callers preparing npz files)."""
    return signature(load(model))


def compress_module(
    module: Any,
    out_dir: str | Path,
    *,
    profile: str = "x86-cpu-vnni",
    sign_key: str | Path | None = None,
    calib: str | Path | None = None,
    eval: str | Path | None = None,
    example: dict[str, np.ndarray] | None = None,
    max_drop: float = 0.01,
    recipe: Recipe | None = None,
    name: str | None = None,
    version: int = 1,
    parent_version: int | None = None,
    finetune: FineTune | None = None,
    train: str | Path | None = None,
    metric: str | None = None,
    latency_rounds: int = 7,
    progress: Progress | None = None,
) -> CompressResult:
    """Python API: compress a ``torch.nn.Module`` into a signed artifact in ``out_dir``.

    Sample inputs come from ``calib``/``eval`` (.npz named after forward()'s parameters) or
    ``example``; ``finetune`` runs after pruning. Raises QualityGateError (nothing written) when no
    candidate meets ``max_drop``; returns the artifact folder, the chosen row and every row tried.
    """
    label = name or type(module).__name__
    calib, eval, train, sign_key = (None if p is None else Path(p) for p in (calib, eval, train, sign_key))
    request = CompressRequest(
        model=label, out_dir=Path(out_dir), profile=profile, recipe=recipe or Recipe.from_options(),
        calib=calib, eval=eval, max_drop=max_drop, name=label, version=version,
        parent_version=parent_version, sign_key=sign_key, module=module, example=example, finetune=finetune,
        train=train, metric=metric, latency_rounds=latency_rounds,
    )  # fmt: skip
    return run(request, progress or (lambda _msg: None))
