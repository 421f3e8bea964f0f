"""The layout pass: rewrite each int8 candidate's graph for ORT's CPU kernels, keep what times faster.

Two rewrites of a QOperator graph that ORT does not make at load, each cutting nodes from every run:

- ``channels_last``: the int8 convolutions and pools written NHWC with ORT's contrib ops, so the
  layout Transposes ORT would insert around them mostly disappear (``channels_last.py``);
- ``fold_dequantize``: a ``QGemm`` whose only reader is a ``DequantizeLinear`` writes float itself
  (its output scale dropped): one node less and one rounding less, so it is scored like any model.

The contrib ops run on ORT's CPU EP only: the pass does nothing for a profile whose int8 runs on any
other EP (TensorRT, CUDA) or when the target's EP is not on this machine (nothing could be timed).
Each rewrite is scored through the quality gate and timed against its source on the target; it
replaces its source only when not slower (``PassContext.keep_not_slower``, shared with the clean-up).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgectl.compress.errors import describe
from edgectl.compress.evaluate import Trial
from edgectl.compress.passes.base import CompressPass, ModelState, PassContext, PassResult
from edgectl.compress.passes.channels_last import MS_DOMAIN, LayoutReport, probe, write_channels_last
from edgectl.compress.passes.gemm import drop_unused_initializers
from edgectl.devices import DeviceProfile


@dataclass(frozen=True)
class LayoutConfig:
    """Which rewrites are tried on each int8 candidate (each kept only where timed not slower)."""

    channels_last: bool = True
    fold_dequantize: bool = True


def refusal(profile: DeviceProfile, on_target: bool) -> str | None:
    """Why the pass cannot run for ``profile`` here, or None when it can."""
    if profile.providers_for("int8") != ("CPUExecutionProvider",) or profile.engine.tensorrt:
        eps = ", ".join(profile.providers_for("int8")) or "no EP"
        return f"int8 runs on {eps} for {profile.name}: the rewrites use contrib ops only ORT's CPU EP has"
    if not on_target:
        return "the target's execution provider is not on this machine: a rewrite could not be timed"
    return None


def fold_dequantize(model: onnx.ModelProto) -> int:
    """Let each ``QGemm`` read only by a per-tensor ``DequantizeLinear`` of its own output scale write
    float itself; returns how many. Changes ``model`` in place."""
    graph = model.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    outputs = {o.name for o in graph.output}
    folded = []
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")):
        gemm = producer.get(dq.input[0])
        if gemm is None or gemm.op_type != "QGemm" or gemm.domain != MS_DOMAIN or len(gemm.input) < 9:
            continue
        if readers.get(dq.input[0]) != 1 or dq.input[0] in outputs or len(dq.input) < 3:
            continue
        same = all(_same_constant(inits, a, b) for a, b in zip(dq.input[1:3], gemm.input[7:9], strict=True))
        scale = inits.get(dq.input[1])
        if not same or scale is None or scale.size != 1:
            continue
        del gemm.input[7:]  # no output scale: QGemm writes alpha * A.B + C in float
        gemm.output[0] = dq.output[0]
        folded.append(dq)
    for dq in folded:
        graph.node.remove(dq)
    if folded:
        del graph.value_info[:]
        # The removed DequantizeLinear's scale and zero point: ORT warned about each on every load.
        drop_unused_initializers(model)
    return len(folded)


def _same_constant(inits: dict[str, np.ndarray], a: str, b: str) -> bool:
    if a == b:
        return a in inits
    return (
        a in inits and b in inits and np.array_equal(inits[a], inits[b]) and inits[a].dtype == inits[b].dtype
    )


@dataclass(frozen=True)
class Rewritten:
    """What one candidate's rewrite changed."""

    layout: LayoutReport
    folded: int

    @property
    def changed(self) -> bool:
        """Whether the rewrite wrote anything."""
        return self.layout.changed or bool(self.folded)

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return {"channels_last": self.layout.to_dict(), "dequantize_folded": self.folded}


def rewrite(src: Path, dst: Path, feed: dict[str, np.ndarray], config: LayoutConfig) -> Rewritten:
    """Write ``src`` with the rewrites ``config`` asks for to ``dst`` (only when something changed)."""
    model = onnx.load(str(src))
    layout = LayoutReport()
    # The probe runs the model once with every tensor as an output: only where there is a conv to move.
    if config.channels_last and any(n.op_type == "QLinearConv" for n in model.graph.node):
        layout = write_channels_last(model, probe(model, feed))
    folded = fold_dequantize(model) if config.fold_dequantize else 0
    done = Rewritten(layout, folded)
    if done.changed:
        onnx.save(model, str(dst))
    return done


class LayoutPass(CompressPass[LayoutConfig]):
    """Replace each passing int8 candidate by its rewrite for ORT's CPU kernels where that is not slower."""

    name = "layout"
    stage = "quantize"
    config = LayoutConfig

    def run(self, state: ModelState, config: LayoutConfig, ctx: PassContext) -> PassResult:
        """Rewrite, score and time each passing candidate against its rewrite; keep the faster."""
        why = refusal(ctx.profile, ctx.on_target)
        if why is not None:
            return PassResult(state, (), {"layout": {"skipped": why}})
        candidates: list[Trial] = []
        trials: list[Trial] = []
        record: dict[str, Any] = {}
        for source in state.candidates:
            if not source.passed or source.path is None:
                candidates.append(source)
                continue
            out = ctx.path("layout")
            try:
                with ctx.clock.stage("layout: rewrite"):
                    done = rewrite(source.path, out, ctx.data.feed(0), config)
            except Exception as exc:  # an optimization: a graph it cannot read keeps its source
                record[source.name] = {"skipped": f"rewrite failed: {describe(exc)}"}
                candidates.append(source)
                continue
            if not done.changed:
                candidates.append(source)
                continue
            ctx.progress(f"layout: {source.name}")
            trial = Trial(f"{source.name} +layout", "layout", out, config=source.config, note=_what(done))
            with ctx.clock.stage("layout: score"):
                trials.append(ctx.judge(trial))
            entry: dict[str, Any] = done.to_dict()
            if trial.passed:
                with ctx.clock.stage("layout: time rewrites"):
                    kept, measured = ctx.keep_not_slower(source.path, [out])
                entry["timing"] = {"input_ms": round(measured[0], 4), "rewrite_ms": round(measured[1], 4)}
                entry["kept"] = kept is not None
            else:
                kept, entry["kept"] = None, False
            if kept is None:
                candidates.append(source)
                trial.note += "; not kept: " + (
                    "slower than its input" if trial.passed else "missed the budget"
                )
            else:
                candidates.append(trial)
                source.note = (source.note + "; " if source.note else "") + "replaced by its layout rewrite"
            record[source.name] = entry
        new = replace(state, candidates=tuple(candidates))
        return PassResult(new, tuple(trials), {"layout": record or {"skipped": "no int8 graph to rewrite"}})


def _what(done: Rewritten) -> str:
    parts = []
    if done.layout.changed:
        parts.append(f"{sum(done.layout.converted.values())} nodes channels-last")
        parts.append(f"{done.layout.transposes} transposes left")
    if done.folded:
        parts.append(f"{done.folded} dequantize folded")
    return ", ".join(parts)
