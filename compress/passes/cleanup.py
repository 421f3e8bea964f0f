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


@dataclass(frozen=True)
class CleanupReport:
    """Node counts before and after, and what happened to BatchNorm nodes."""

    nodes_before: int
    nodes_after: int
    batchnorm_before: int
    batchnorm_after: int
    symbolic_shapes: bool
    fused: dict[str, int] = field(default_factory=dict)

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


def _fuse_transformer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ORT's transformer fusions (python graph rewrites, no session); heads and width are detected."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    fused = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    return fused.model, stats


def cleanup(src: Path, dst: Path, config: CleanupConfig | None = None) -> CleanupReport:
    """Write the cleaned-up ``src`` to ``dst``."""
    import onnxruntime as ort

    cfg = config or CleanupConfig()
    before = onnx.load(str(src))
    ops_before = Counter(n.op_type for n in before.graph.node)
    model = before
    if cfg.optimize:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(dst)
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(dst))
    fused: dict[str, int] = {}
    if cfg.fuse_transformer and _is_transformer(model):
        try:
            model, fused = _fuse_transformer(model)
        except Exception:  # a graph the fusion scripts do not know stays as it is; it is still valid
            fused = {}
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
    )


class CleanupPass(CompressPass[CleanupConfig]):
    """Clean up the float graph; the pipeline scores the result if no later float pass does."""

    name = "cleanup"
    stage = "float"
    config = CleanupConfig

    def run(self, state: ModelState, config: CleanupConfig, ctx: PassContext) -> PassResult:
        """Write the cleaned-up model and hand it on, unscored."""
        ctx.progress("cleaning up the graph")
        out = ctx.path("clean")
        report = cleanup(state.model, out, config)
        return PassResult(replace(state, model=out, base=None), (), {"cleanup": report.to_dict()})
