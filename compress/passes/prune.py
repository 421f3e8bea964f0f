"""Structured channel pruning on the ONNX graph, and unstructured pruning where kernels use it.

Pruning works on the (cleaned-up, BatchNorm-folded) ONNX graph, so ONNX-file inputs are prunable
too. Channels are grouped by dependency (``edgectl.compress.channel_groups``). A group is pruned as a whole by removing whole
filters from its producers and the matching slices from every consumer; a group that reaches a
graph output or an op we cannot follow is left alone (and reported). Removed channels' average
contribution is folded into the consumers' biases on calibration data (``recalibrate``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgectl.compress.channel_groups import ChannelGroup, channel_groups
from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError, PruneRefusedError
from edgectl.compress.evaluate import Trial
from edgectl.compress.graph import cpu_session, load
from edgectl.compress.passes.base import CompressPass, ModelState, PassContext, PassResult
from edgectl.devices import DeviceProfile

# Recovery epochs when --finetune-epochs is not given: on three digits CNNs pruned 50 %, 3 seeds each,
# 10 epochs of the warm-up + cosine schedule (recover.LearningRate) came within 1.1 pt of float top-1
# (five of 450 samples; most within 1 pt) where 3 epochs lost up to 2 pt; the time budget still bounds it.
DEFAULT_FINETUNE_EPOCHS = 10


@dataclass(frozen=True)
class PruneConfig:
    """``ratio`` of channels to remove per group; kept counts round to ``round_to`` for fast kernels."""

    ratio: float = 0.5
    kind: Literal["structured", "unstructured"] = "structured"
    round_to: int = 8
    recalibrate: bool = True
    # Recovery training (torch models with --train data): at most this many epochs and seconds.
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    finetune_seconds: float = 600.0
    # --prune auto: try these ratios, largest first, and keep the largest that meets the budget.
    ratios: tuple[float, ...] = ()


@dataclass(frozen=True)
class PruneReport:
    """What was pruned: groups, channels before and after, and why other groups were left alone."""

    groups: int
    pruned_groups: int
    channels_before: int
    channels_after: int
    skipped: tuple[str, ...]
    recalibrated_nodes: int

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return {**self.__dict__, "skipped": list(self.skipped)}

    def share_note(self, ratio: float) -> str:
        """The share of channels actually removed, where it is not the ratio asked for: groups kept
        whole (a Concat, a graph output) and kept counts rounded to kernel blocks make the row's
        "pruned N %" otherwise a claim the model does not bear out."""
        removed = self.channels_before - self.channels_after
        share = removed / max(self.channels_before, 1)
        if abs(share - ratio) <= 0.05:
            return ""
        kept = self.groups - self.pruned_groups
        whole = f"; {kept} of {self.groups} channel groups kept whole" if kept else ""
        return f"removed {removed} of {self.channels_before} channels ({share:.0%}){whole}"


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """How many of ``channels`` pruning at ``ratio`` keeps: the nearest multiple of ``round_to`` (fast
    int8 kernels work in blocks), at least one block; layers under two blocks round to one channel."""
    step = round_to if channels >= 2 * round_to else 1
    return min(channels, int(max(step, round(channels * (1.0 - ratio) / step) * step)))


def _keep(group: ChannelGroup, arrays: dict[str, np.ndarray], cfg: PruneConfig) -> np.ndarray:
    """Indices of the channels to keep: the largest filters (L2, normalised per producer)."""
    score = np.zeros(group.channels)
    for name in group.producers:
        norms = np.linalg.norm(arrays[name].reshape(group.channels, -1), axis=1)
        score += norms / max(float(norms.mean()), 1e-12)
    keep = kept_channels(group.channels, cfg.ratio, cfg.round_to)
    return np.sort(np.argsort(-score, kind="stable")[:keep])


def prune_structured(src: Path, dst: Path, cfg: PruneConfig, calib: SampleSet | None = None) -> PruneReport:
    """Remove ``cfg.ratio`` of the channels of every prunable group of ``src``; write ``dst``."""
    if not 0.0 <= cfg.ratio < 1.0:
        raise PruneRefusedError(f"prune ratio must be in [0, 1), got {cfg.ratio}")
    model = onnx.load(str(src))
    groups = channel_groups(model)
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        for i in n.input:
            uses[i] += 1
    skipped = [f"{len(g.producers)} conv(s) x {g.channels} ch: {g.problem}" for g in groups if g.problem]
    slices: list[tuple[str, int, np.ndarray]] = []
    bias_fix: list[tuple[onnx.NodeProto, str, int, np.ndarray]] = []
    regroup: list[tuple[onnx.NodeProto, int]] = []
    before = after = 0
    pruned = 0
    for group in groups:
        before += group.channels
        if group.problem is None and any(uses[w] > 1 for w in group.producers + group.params):
            group.problem = "a weight is shared with another node"
            skipped.append(f"{group.channels} ch: {group.problem}")
        keep = np.arange(group.channels) if group.problem else _keep(group, arrays, cfg)
        after += len(keep)
        if len(keep) == group.channels:
            continue
        pruned += 1
        for name in group.producers + group.biases + group.params:
            slices.append((name, group.param_axes.get(name, 0), keep))
        regroup += [(node, len(keep)) for node in group.depthwise]
        drop = np.setdiff1d(np.arange(group.channels), keep)
        for node, weight, axis, hw in group.consumers:
            cols = (keep[:, None] * hw + np.arange(hw)[None, :]).ravel()
            slices.append((weight, axis, cols))
            bias_fix.append((node, weight, axis, (drop[:, None] * hw + np.arange(hw)[None, :]).ravel()))
        for shape_name, hw in group.reshapes:
            arrays[shape_name] = np.array([arrays[shape_name][0], len(keep) * hw], dtype=np.int64)
    fixed = _recalibrate(model, arrays, bias_fix, calib) if cfg.recalibrate and calib is not None else 0
    # Graph edits only after recalibration, which runs the unpruned model.
    for node, groups_now in regroup:
        for a in node.attribute:
            if a.name == "group":
                a.i = groups_now
    for name, axis, idx in slices:
        arrays[name] = np.take(arrays[name], idx, axis=axis)
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return PruneReport(len(groups), pruned, before, after, tuple(skipped), fixed)


def _recalibrate(
    model: onnx.ModelProto,
    arrays: dict[str, np.ndarray],
    fixes: list[tuple[onnx.NodeProto, str, int, np.ndarray]],
    calib: SampleSet,
) -> int:
    """Fold the mean contribution of removed input channels into each consumer's bias.

    A consumer loses ``sum_c W[:, c] * x_c`` over the removed channels ``c``; on calibration data its
    expectation is ``W[:, removed] @ mean(x_removed)``, which a bias can carry exactly (up to padding).
    """
    if not fixes:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = sorted({n.input[0] for n, *_ in fixes})
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in wanted if t not in known])
    session = cpu_session(probe.SerializeToString(), threads=0)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in calib.take(64).batches(16):
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        for t in wanted:
            x = np.asarray(outs[t], dtype=np.float64)
            # Per input feature (flat) or per channel (NCHW, averaged over space).
            per = (
                x.reshape(x.shape[0], -1)
                if x.ndim == 2
                else x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)
            )
            sums[t] = sums.get(t, 0) + per.sum(axis=0)
        count += next(iter(feed.values())).shape[0]
    for node, weight, axis, dropped in fixes:
        mean = sums[node.input[0]] / max(count, 1)
        w = arrays[weight]
        if node.op_type == "Conv":
            # Summed over the kernel's taps: 1 (Conv1d), 2 or 3 spatial axes.
            taps = w[:, dropped].sum(axis=tuple(range(2, w.ndim)))
            shift = np.tensordot(taps, mean[dropped], axes=([1], [0]))
        else:
            wd = np.take(w, dropped, axis=axis)
            shift = mean[dropped] @ (wd if axis == 0 else wd.T)
        bias_index = 2
        if node.op_type == "Gemm":
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
            shift = shift * alpha / (beta or 1.0)
        if node.op_type == "MatMul" or len(node.input) <= bias_index or not node.input[bias_index]:
            continue  # no bias to carry the shift; the fine-tune hook is the remedy there
        bias = node.input[bias_index]
        arrays[bias] = (arrays[bias] + shift.astype(arrays[bias].dtype)).astype(arrays[bias].dtype)
    return len(fixes)


def prune_unstructured(src: Path, dst: Path, cfg: PruneConfig, *, profile_name: str, sparse_2_4: bool) -> int:
    """Zero the 2 smallest of every 4 input weights (2:4) where the target runs sparse kernels.

    Zeros that no kernel skips make a model neither faster nor smaller, so without 2:4 support on
    the target this refuses instead of pretending.
    """
    if not sparse_2_4:
        raise PruneRefusedError(
            f"unstructured pruning would not speed up {profile_name}: its kernels are dense "
            "(ORT's CPU EP skips no zeros)",
            hint="use structured channel pruning (prune kind: structured), which removes whole channels",
        )
    model = onnx.load(str(src))
    weights = {
        n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
    }
    done = 0
    for init in model.graph.initializer:
        if init.name not in weights:
            continue
        w = numpy_helper.to_array(init)
        if w.ndim < 2 or w.shape[1] % 4:
            continue  # TensorRT's sparse tactics need input channels in multiples of 4
        moved = np.moveaxis(w, 1, -1)
        groups = moved.reshape(-1, 4)
        order = np.argsort(np.abs(groups), axis=1)
        mask = np.ones_like(groups, dtype=bool)
        np.put_along_axis(mask, order[:, :2], False, axis=1)
        pruned = np.moveaxis((groups * mask).reshape(moved.shape), -1, 1)
        init.CopyFrom(numpy_helper.from_array(pruned.astype(w.dtype), init.name))
        done += 1
    onnx.save(model, str(dst))
    return done


class PrunePass(CompressPass[PruneConfig]):
    """Prune the float model, score it, and run the request's fine-tune hook on a structured result."""

    name = "prune"
    stage = "float"
    config = PruneConfig

    def check(self, config: PruneConfig, profile: DeviceProfile, *, has_calib: bool) -> None:
        """A recipe's ratio outside [0, 1), no recovery epochs or a block under one channel fails before
        the export, not (exit 1, or a division by zero) after it."""
        bad = [r for r in (config.ratio, *config.ratios) if not 0.0 <= r < 1.0]
        if bad:
            raise BadInputError(f"prune: ratio must be a fraction in [0, 1), got {bad[0]}", hint="e.g. 0.5")
        if config.finetune_epochs < 1 or not config.finetune_seconds > 0 or config.round_to < 1:
            raise BadInputError(
                "prune: finetune_epochs and round_to must be at least 1 and finetune_seconds above 0, got "
                f"{config.finetune_epochs}, {config.round_to} and {config.finetune_seconds}"
            )

    def run(self, state: ModelState, config: PruneConfig, ctx: PassContext) -> PassResult:
        """Write the pruned (and fine-tuned) model; with ``ratios``, the largest ratio that passes."""
        if not config.ratios:
            return self._prune(state, config, ctx)
        started, trials = time.perf_counter(), list[Trial]()
        result = PassResult(state)
        # Only the ratios tried: the search stops at the first that passes, a refusal, or its time.
        auto: dict[str, Any] = {"tried": [], "kept": None}
        for ratio in sorted(config.ratios, reverse=True):
            auto["tried"].append(ratio)
            try:
                result = self._prune(state, replace(config, ratio=ratio, ratios=()), ctx)
            except PruneRefusedError as exc:
                # The largest ratio removing nothing, the smaller ones remove nothing either.
                ctx.progress(f"--prune auto: nothing to prune ({exc})")
                auto["reason"] = str(exc)
                return PassResult(state, tuple(trials), {"prune": {"auto": auto}})
            trials += result.trials
            if result.state.base is not None and result.state.base.passed:
                auto["kept"] = result.state.base.name
                break
            if time.perf_counter() - started > config.finetune_seconds:
                ctx.progress("--prune auto: out of time")
                break
        if auto["kept"] is None:
            # "The largest ratio that meets the budget": none did, so the model stays as it was.
            ctx.progress("--prune auto: no ratio tried met the budget; pruning nothing")
            return PassResult(
                state, tuple(trials), {"prune": {**result.record.get("prune", {}), "auto": auto}}
            )
        record = {**result.record, "prune": {**result.record.get("prune", {}), "auto": auto}}
        return PassResult(result.state, tuple(trials), record)

    def _prune(self, state: ModelState, config: PruneConfig, ctx: PassContext) -> PassResult:
        if config.ratio <= 0:
            return PassResult(state)
        if ctx.train is not None and config.kind == "structured":
            if ctx.torch_model is not None:
                return self._recover(state, config, ctx)
            ctx.progress("--train needs a PyTorch model: an ONNX input gets bias recalibration only")
        ctx.progress(f"pruning {config.ratio:.0%} of channels")
        pruned = ctx.path("pruned")
        record: dict[str, Any] = {}
        if ctx.train is not None and config.kind == "structured":
            record["recovery"] = {
                "trained": False,
                # Not .pt2: a torch.export program hides its nn.Conv/nn.Linear layers from Torch-Pruning.
                "reason": "recovery training needs the model as PyTorch (package.module:factory with "
                "--state-dict, or the Python API); an ONNX input gets bias recalibration only",
            }
        if config.kind == "unstructured":
            sparse = ctx.profile.sparsity.structured_2_4
            n = prune_unstructured(
                state.model, pruned, config, profile_name=ctx.profile.name, sparse_2_4=sparse
            )
            record["prune"] = {"kind": "2:4", "tensors": n}
        else:
            report = prune_structured(state.model, pruned, config, ctx.calib or ctx.data)
            if not report.pruned_groups:
                # A row named "pruned N%" for the model as it was would claim a ratio never applied.
                why = "; ".join(report.skipped[:3]) or (
                    "every group keeps all its channels at this ratio (kept counts round to "
                    f"multiples of {config.round_to})"
                    if report.groups
                    else "graph pruning follows Conv channels and this graph has no prunable Conv"
                )
                raise PruneRefusedError(
                    f"structured pruning at {config.ratio:.0%} removes no channel from this model: {why}",
                    hint="pass a PyTorch model (package.module:factory with --state-dict) to prune its "
                    "nn.Linear/nn.Conv layers, or drop --prune",
                )
            record["prune"] = report.to_dict()
        row = Trial(f"pruned {config.ratio:.0%}", "prune", pruned, config=dict(config.__dict__))
        if config.kind == "structured":
            row.note = report.share_note(config.ratio)
        trials = [ctx.judge(row)]
        if ctx.finetune is not None:
            ctx.progress("fine-tuning the pruned model on calibration data")
            tuned = ctx.path("finetuned")
            ctx.finetune(pruned, tuned, ctx.calib or ctx.data)
            load(tuned)  # the hook must leave a readable model behind
            trials.append(ctx.judge(Trial(f"pruned {config.ratio:.0%} + fine-tuned", "prune", tuned)))
            record["finetune"] = {"hook": getattr(ctx.finetune, "__qualname__", repr(ctx.finetune))}
        new = replace(state, model=trials[-1].path or pruned, base=trials[-1])
        return PassResult(new, tuple(trials), record)

    def _recover(self, state: ModelState, config: PruneConfig, ctx: PassContext) -> PassResult:
        """Prune the torch model with Torch-Pruning, distil it from the float model, export both rows."""
        from edgectl.compress.passes.cleanup import CleanupConfig, cleanup
        from edgectl.compress.passes.export import export_module
        from edgectl.compress.recover import prune_and_recover

        assert ctx.train is not None
        names = list(ctx.data.inputs)
        pruned, recovered, report = prune_and_recover(
            ctx.torch_model, config.ratio, ctx.train, names, epochs=config.finetune_epochs,
            time_budget_s=config.finetune_seconds, progress=ctx.progress,
        )  # fmt: skip
        trials: list[Trial] = []
        for label, module in ((f"pruned {config.ratio:.0%} (torch)", pruned), (
            f"pruned {config.ratio:.0%} + recovered ({report.epochs} epochs distilled)", recovered)):  # fmt: skip
            exported, out = ctx.path("torch-pruned"), ctx.path("torch-pruned-clean")
            ctx.progress(f"exporting {label} to ONNX")  # seconds per export: say what the wait is
            export_module(module, dict(ctx.train.inputs), exported, names=names)
            # Same clean-up as the float model had, so like is compared with like.
            cleanup(exported, out, CleanupConfig(fuse_transformer=False))
            trials.append(ctx.judge(Trial(label, "prune", out, config=dict(config.__dict__))))
        record = {"prune": {"kind": "structured (torch)", **report.to_dict()}, "recovery": {"trained": True}}
        return PassResult(
            replace(state, model=trials[-1].path or state.model, base=trials[-1]), tuple(trials), record
        )
