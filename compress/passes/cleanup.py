"""Graph clean-up before pruning and quantization: shape inference, constant folding, BN folding.

Constant folding and the Conv+BatchNorm / Conv+Add / Conv+Mul fusions are ORT's *basic*
(provider-independent) graph optimizations, saved back as plain ONNX; shapes are then inferred
(symbolically first, as transformer graphs need) so every tensor the quantizer sees has a shape.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from onnx import shape_inference

from edgectl.compress.passes.base import CompressPass, ModelState, PassContext, PassResult
from edgectl.compress.passes.residual import keep_residual_unfused, residual_as_add

# ORT's quantization tools look for this mark to know a model was pre-processed.
_PRE_PROCESS_KEY = "onnx.quant.pre_process"


@dataclass(frozen=True)
class CleanupConfig:
    """Which clean-up steps run."""

    optimize: bool = True
    symbolic_shapes: bool = True
    # Transformer fusions (SkipLayerNormalization, BiasGelu, Attention): contrib ops that ORT's CPU
    # and CUDA EPs run, and that keep int8 graphs fused after quantization breaks the float patterns.
    # Off for TensorRT engine builds: TensorRT's ONNX parser reads only standard ops.
    fuse_transformer: bool = True
    # Residual Add + LayerNormalization kept as standard ops, never SkipLayerNormalization: ORT's CPU
    # kernel of that contrib op is several times slower (passes/residual.py). Off where not on target.
    residual_unfused: bool = True


@dataclass(frozen=True)
class CleanupReport:
    """Node counts before and after, and what happened to BatchNorm nodes."""

    nodes_before: int
    nodes_after: int
    batchnorm_before: int
    batchnorm_after: int
    symbolic_shapes: bool
    fused: dict[str, int] = field(default_factory=dict)
    residual_sums: int = 0

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return dict(self.__dict__)


def _infer(model: onnx.ModelProto, symbolic: bool) -> tuple[onnx.ModelProto, bool]:
    if symbolic:
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            # Symbolic inference logs a warning per op it cannot follow; the ONNX pass below covers those.
            logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True), True
        except Exception:  # unsupported ops: plain ONNX inference still gives most shapes
            pass
    return shape_inference.infer_shapes(model), False


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node stack traces and doc strings (the dynamo exporter adds ~300 bytes a node)."""
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        node.doc_string = ""
        del node.metadata_props[:]
        # ORT's quantizer keys its exclusion list on node names: every node needs a unique one.
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{i}"
        used.add(node.name)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.doc_string = ""
        del value.metadata_props[:]


def _is_transformer(model: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in model.graph.node}
    has_norm = "LayerNormalization" in ops or "SkipLayerNormalization" in ops or "ReduceMean" in ops
    return "Softmax" in ops and "MatMul" in ops and has_norm


def _fuse_transformer(model: onnx.ModelProto, skip_norm: bool) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ORT's transformer fusions (python graph rewrites, no session); heads and width are detected."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = skip_norm
    fused = optimize_model(
        model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0, optimization_options=options
    )
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    return fused.model, stats


def ort_basic(src: Path, dst: Path) -> None:
    """Write ORT's basic (provider-independent) rewrites of ``src`` to ``dst`` as plain ONNX."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def cleanup(
    src: Path, dst: Path, config: CleanupConfig | None = None, *, optimized: Path | None = None
) -> CleanupReport:
    """Write the cleaned-up ``src`` to ``dst``.

    ``optimized``: ``ort_basic(src)`` already written there (variants of one clean-up share it).
    """
    cfg = config or CleanupConfig()
    before = onnx.load(str(src))
    ops_before = Counter(n.op_type for n in before.graph.node)
    model = before
    if cfg.optimize:
        if optimized is None:
            optimized = dst
            ort_basic(src, dst)
        model = onnx.load(str(optimized))
    fused: dict[str, int] = {}
    if cfg.fuse_transformer and _is_transformer(model):
        try:
            model, fused = _fuse_transformer(model, skip_norm=not cfg.residual_unfused)
        except Exception:  # a graph the fusion scripts do not know stays as it was before them
            # They rewrite the proto in place and can fail half-way (a GPT-2 export: "Graph is not a
            # DAG" after the FastGelu fusion), leaving nodes that read tensors no node writes any more.
            model = onnx.load(str(optimized if optimized is not None else src))
            fused = {}
    sums = keep_residual_unfused(model) if cfg.residual_unfused else 0
    # Shape info from the old graph may be stale after fusions: infer again from scratch.
    del model.graph.value_info[:]
    model, symbolic = _infer(model, cfg.symbolic_shapes)
    _strip_debug_info(model)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != _PRE_PROCESS_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (_PRE_PROCESS_KEY, "onnxruntime.quant")]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    ops_after = Counter(n.op_type for n in model.graph.node)
    return CleanupReport(
        nodes_before=len(before.graph.node),
        nodes_after=len(model.graph.node),
        batchnorm_before=ops_before["BatchNormalization"],
        batchnorm_after=ops_after["BatchNormalization"],
        symbolic_shapes=symbolic,
        fused=fused,
        residual_sums=sums,
    )


class CleanupPass(CompressPass[CleanupConfig]):
    """Clean up the float graph, keeping each rewrite only if it is measured not slower than its input.

    ORT rewrites the graph again when it loads it, so a saved rewrite can lose to the original
    (a fused contrib op slower than ORT's own kernels, a layout it would have chosen better).
    Every candidate is timed against the input on the target; the slower ones are discarded and
    the input keeps only what costs no time (inferred shapes, node names the quantizer needs, and
    residual adds as Sum: with shapes known, ORT fuses them into its slower SkipLayerNormalization).
    """

    name = "cleanup"
    stage = "float"
    config = CleanupConfig

    def run(self, state: ModelState, config: CleanupConfig, ctx: PassContext) -> PassResult:
        """Write the cleaned-up model (or the input with shapes only) and hand it on, unscored."""
        ctx.progress("cleaning up the graph")
        if not ctx.on_target:  # the contrib op may well be the fast one on another EP (CUDA)
            config = replace(config, residual_unfused=False)
        tried: list[tuple[str, Path, CleanupReport]] = []
        out = ctx.path("clean")
        with ctx.clock.stage("cleanup: rewrite"):
            basic = ctx.path("ort-basic") if config.optimize else None
            if basic is not None:
                ort_basic(state.model, basic)  # once: the variants below differ only after it
            tried.append(("full", out, cleanup(state.model, out, config, optimized=basic)))
            if config.fuse_transformer and tried[0][2].fused and ctx.on_target:
                out = ctx.path("clean-nofuse")
                nofuse = replace(config, fuse_transformer=False)
                tried.append(("without fusions", out, cleanup(state.model, out, nofuse, optimized=basic)))
            if tried[0][2].residual_sums and ctx.on_target:
                # Measured, not assumed: the full clean-up with its residual adds given back to Add,
                # which ORT fuses into SkipLayerNormalization at load (the shapes are inferred).
                out = ctx.path("clean-skipnorm")
                model = onnx.load(str(tried[0][1]))
                residual_as_add(model)
                onnx.save(model, str(out))
                tried.append(("with SkipLayerNormalization", out, replace(tried[0][2], residual_sums=0)))
        if not ctx.on_target:
            # Timings here say nothing about the target's EP (a GPU, TensorRT): keep the full clean-up.
            label, out, report = tried[0]
            record = {
                **report.to_dict(),
                "kept": label,
                "timing": "not timed: the target's EP is not on this machine",
            }
        elif config.optimize or tried[0][2].fused:
            with ctx.clock.stage("cleanup: time rewrites"):
                # The input is the reference; of the rewrites only the fastest can be kept.
                kept, p50 = ctx.keep_not_slower(state.model, [p for _, p, _ in tried])
            measured = {"input_ms": round(p50[0], 4)}
            for (label, _, _), ms in zip(tried, p50[1:], strict=True):
                measured[f"{label}_ms"] = round(ms, 4)
            if kept is not None:
                label, out, report = tried[kept]
                record = {**report.to_dict(), "kept": label, "timing": measured}
            else:
                # No rewrite pays: keep the input's graph, with only the metadata later passes need.
                out = ctx.path("clean-shapes")
                light = CleanupConfig(
                    optimize=False,
                    symbolic_shapes=config.symbolic_shapes,
                    fuse_transformer=False,
                    residual_unfused=config.residual_unfused,
                )
                report = cleanup(state.model, out, light)
                record = {
                    **report.to_dict(), "kept": "input graph (shapes only)", "timing": measured,
                    "reason": "every clean-up rewrite was slower than its input on the target",
                }  # fmt: skip
        else:
            label, out, report = tried[0]
            record = report.to_dict()
        return PassResult(replace(state, model=out, base=None), (), {"cleanup": record})
