"""Structured pruning in PyTorch that recovers its accuracy: Torch-Pruning, then knowledge distillation.

For models given as PyTorch (a factory, an ``nn.Module`` through the Python API, or a ``.pt2``
program, whose aten calls ``lift.lift_layers`` turns back into layers) with ``--train`` data:
Torch-Pruning's dependency graph removes ``ratio`` of the channels of
every prunable group (the classifier head keeps its outputs), then the pruned student is trained
against the float model as teacher (softened-logit KL, plus cross-entropy where the data has
labels) for a bounded number of epochs and seconds, on CUDA when there is one. torch is imported
here and in ``passes/export.py`` only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgectl.compress.data import SampleSet
from edgectl.compress.errors import BadInputError, CompressError, PruneRefusedError, describe
from edgectl.compress.lift import lift_for_training, pinned_batch
from edgectl.compress.metrics import label_problem
from edgectl.compress.passes.export import plain_attention
from edgectl.compress.prune_refusal import nothing_removed

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RecoveryReport:
    """What recovery did: the pruner, parameters before and after, epochs, time, device, last loss."""

    pruner: str
    params_before: int
    params_after: int
    epochs: int
    seconds: float
    device: str
    final_loss: float
    labels_used: bool

    def to_dict(self) -> dict[str, object]:
        """For the manifest."""
        return dict(self.__dict__)


def _params(module: torch.nn.Module) -> int:
    # A .pt2 loads a tied weight as two Parameters on one storage: count it once, as the model has it.
    unique = {(p.data_ptr(), tuple(p.shape)): p for p in module.parameters()}
    return sum(int(p.numel()) for p in unique.values())


def _outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors: one tensor, a tuple/list, a dict (in order), or a
    ``ModelOutput``-like object with ``to_tuple``."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def _heads(module: torch.nn.Module, example: Sequence[torch.Tensor]) -> list[torch.nn.Module]:
    """Layers whose outputs are the model's outputs (class logits, a per-pixel map, an embedding): never
    pruned, or an output would change shape.

    A layer counts when the model returns its output or a view of it (same storage: a reshape, a
    permute); for an output no layer made that way (behind a softmax, a sigmoid), every layer whose
    width is the output's channel count (axis 1) or last dim.
    """
    import torch

    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    layers: list[torch.nn.Module] = [m for m in module.modules() if isinstance(m, kinds)]
    made: dict[int, list[torch.nn.Module]] = {}

    def record(layer: torch.nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            made.setdefault(out.untyped_storage().data_ptr(), []).append(layer)

    hooks = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            outs = _outputs(module(*example))
    finally:
        for h in hooks:
            h.remove()
    heads: dict[int, torch.nn.Module] = {}
    for o in outs:
        direct = made.get(o.untyped_storage().data_ptr(), [])
        widths = {int(o.shape[-1])} if o.ndim else set()
        widths |= {int(o.shape[1])} if o.ndim >= 3 else set()
        for m in direct or [
            m for m in layers if getattr(m, "out_features", getattr(m, "out_channels", -1)) in widths
        ]:
            heads[id(m)] = m
    return list(heads.values()) or layers[-1:]


def _shapes(module: torch.nn.Module, example: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    import torch

    with torch.no_grad():
        return [tuple(o.shape) for o in _outputs(module(*example))]


def prune_torch(
    module: torch.nn.Module, ratio: float, example: Sequence[torch.Tensor], *, round_to: int = 8
) -> torch.nn.Module:
    """A pruned deep copy of ``module``: ``ratio`` of each prunable channel group removed by L2 magnitude."""
    import torch
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise PruneRefusedError(f"prune ratio must be in (0, 1), got {ratio}")
    from edgectl.compress.passes.prune import kept_channels

    student = copy.deepcopy(module).eval()
    heads = _heads(student, example)
    # Torch-Pruning's own round_to floors the kept count (32 channels at 30 % kept 16, as at 50 %), so
    # each layer gets the ratio that keeps the graph pruner's count: the nearest multiple of round_to.
    # Half a channel over the target survives its int() truncation.
    ratios: dict[torch.nn.Module, float] = {}
    for layer in student.modules():
        width = getattr(layer, "out_channels", getattr(layer, "out_features", 0))
        if (
            isinstance(layer, torch.nn.modules.conv._ConvNd | torch.nn.Linear)
            and layer not in heads
            and width
        ):
            ratios[layer] = max(0.0, 1.0 - (kept_channels(width, ratio, round_to) + 0.5) / width)
    try:
        pruner = tp.pruner.MetaPruner(
            student, tuple(example), importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, pruning_ratio_dict=ratios, ignored_layers=heads,
        )  # fmt: skip
        pruner.step()
    except Exception as exc:  # its dependency tracer raises many types on graphs it cannot follow
        raise PruneRefusedError(
            f"Torch-Pruning cannot prune this model ({describe(exc, 200)})",
            hint="pass the model as ONNX to prune on the graph (bias recalibration instead of training)",
        ) from exc
    before = _shapes(module, example)
    try:
        after = _shapes(student, example)
    except Exception as exc:  # the user's forward() on the pruned layers: any error is the refusal
        raise PruneRefusedError(
            f"the model Torch-Pruning pruned no longer runs ({describe(exc, 200)}): its forward() reshapes "
            "by a width the pruning changed (attention heads split with view(), a hard-coded size)",
            hint="drop --prune, or compute such shapes from the tensors (e.g. view(n, t, heads, -1))",
        ) from exc
    if before != after:
        # A head the dependency graph let it prune: the artifact would answer in another shape.
        raise PruneRefusedError(
            f"Torch-Pruning changed this model's output shapes ({before} -> {after}): a layer behind an "
            "output was pruned",
            hint="pass the model as ONNX to prune on the graph, or drop --prune",
        )
    if _params(student) >= _params(module):
        raise nothing_removed(student, heads, ratio, example)  # whole: heads are its layers
    return student


def _loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    import torch.nn.functional as F

    if student_out.ndim == 2 and student_out.shape[-1] > 1:
        t = temperature
        kd = F.kl_div(
            F.log_softmax(student_out / t, dim=-1), F.softmax(teacher_out / t, dim=-1), reduction="batchmean"
        )
        kd = kd * t * t
    else:  # regression or embeddings: match the teacher's outputs
        kd = F.mse_loss(student_out, teacher_out)
    if labels is None:
        return kd
    return 0.5 * kd + 0.5 * F.cross_entropy(student_out, labels)


def _check_labels(labels: torch.Tensor, teacher: torch.nn.Module, example: list[torch.Tensor]) -> None:
    """Labels are class ids of the model's first output, ``[batch, classes]``: cross-entropy fails otherwise."""
    import torch

    with torch.no_grad(), plain_attention():
        out = _outputs(teacher(*example))[0]
    low, high = int(labels.min()), int(labels.max())
    # Cross-entropy takes [batch, classes] as it is: a [batch, 1, classes] output is not class scores here.
    what = (
        label_problem(tuple(out.shape), low, high)
        if out.ndim == 2
        else f"shape {tuple(out.shape[1:])} per sample, not class scores"
    )
    if what is not None:
        raise BadInputError(
            f"training labels run {low}..{high}, but the model's first output has {what}",
            hint="save labels as class ids 0..classes-1, or leave them out to distil the outputs only",
        )


def recover(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: SampleSet,
    names: Sequence[str],
    *,
    epochs: int,
    time_budget_s: float,
    progress: Callable[[str], None],
    lr: float = 5e-3,
    batch: int = 64,
    temperature: float = 4.0,
    seed: int = 0,
) -> tuple[int, float, str]:
    """Distil ``teacher`` into ``student`` on ``data``; returns (epochs run, last epoch's loss, device)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        # Small batches gain little from more threads, and on a busy host extra threads only spin.
        torch.set_num_threads(1)
    try:
        return _train(
            student,
            teacher,
            data,
            names,
            device,
            epochs,
            time_budget_s,
            progress,
            lr,
            batch,
            temperature,
            seed,
        )
    finally:
        torch.set_num_threads(threads)
        student.cpu().eval()
        teacher.cpu()


@dataclass(frozen=True)
class LearningRate:
    """Adam's step size along a recovery run: a linear warm-up over the first 5 % of its steps (the
    pruned weights are a warm start a full-size first step would scatter), then cosine annealing to
    zero at its last step. Measured against a constant 1e-3 on three digits CNNs, 3 seeds each,
    50 % pruned: that lost up to 6 pt of top-1 in 3 epochs; this schedule stayed within 1.1 pt in 10."""

    peak: float
    total_steps: int

    def at(self, step: int) -> float:
        warmup = max(1, self.total_steps // 20)
        if step < warmup:
            return self.peak * (step + 1) / warmup
        left = (step - warmup) / max(1, self.total_steps - warmup)
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, left)))


def _train(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: SampleSet,
    names: Sequence[str],
    device: str,
    epochs: int,
    time_budget_s: float,
    progress: Callable[[str], None],
    lr: float,
    batch: int,
    temperature: float,
    seed: int,
) -> tuple[int, float, str]:
    import torch

    student.to(device).train()
    teacher = teacher.to(device).eval()
    inputs = [torch.from_numpy(np.ascontiguousarray(data.inputs[n])) for n in names]
    labels = None if data.labels is None else torch.from_numpy(data.labels.astype(np.int64))
    if labels is not None:
        _check_labels(labels, teacher, [x[:2].to(device) for x in inputs])
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    # A lone last sample joins the batch before it: BatchNorm cannot train on a batch of one.
    steps = max(1, data.count // batch + (data.count % batch > 1))
    schedule = LearningRate(lr, epochs * steps)
    started, done, last = time.perf_counter(), 0, float("nan")
    shown = -1  # the bar's fill last shown: a log gets a line per twentieth, not one per step
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(data.count))
        total = 0.0
        for step in range(steps):
            idx = order[step * batch : None if step == steps - 1 else (step + 1) * batch]
            args = [x[idx].to(device) for x in inputs]
            with torch.no_grad(), plain_attention():  # the student (training) computes padded tokens too
                targets = _outputs(teacher(*args))
            # Every head is distilled (a detector's boxes as well as its classes); labels score the first.
            given = None if labels is None else labels[idx].to(device)
            try:
                outs = _outputs(student(*args))
            except Exception as exc:  # the user's forward() in training mode
                raise CompressError(
                    f"recovery training failed on a batch of {len(idx)} sample(s): {describe(exc, 200)}",
                    hint="the model must run in train() mode on batches of that size; or drop --train",
                ) from exc
            loss = sum(
                (
                    _loss(got, want, given if i == 0 else None, temperature)
                    for i, (got, want) in enumerate(zip(outs, targets, strict=True))
                ),
                torch.zeros((), device=device),
            )
            for group in optimizer.param_groups:
                group["lr"] = schedule.at(epoch * steps + step)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
            filled = int(20 * (epoch * steps + step + 1) / (epochs * steps))
            if filled != shown or step == steps - 1:
                shown = filled
                progress(
                    f"recovering [{'#' * filled}{'.' * (20 - filled)}] epoch {epoch + 1}/{epochs} loss {total / (step + 1):.4f}"
                )
        done, last = epoch + 1, total / steps
        spent = time.perf_counter() - started
        if spent > time_budget_s:
            break  # the budget bounds the run; the epochs done so far are kept
        if epoch == 0:
            # The schedule anneals over the epochs the budget leaves room for, not ones it will cut.
            fit = max(1, int(time_budget_s / max(spent, 1e-9)))
            schedule = LearningRate(lr, min(epochs, fit) * steps)
    return done, last, device


def prune_and_recover(
    module: torch.nn.Module,
    ratio: float,
    train: SampleSet,
    names: Sequence[str],
    *,
    epochs: int,
    time_budget_s: float,
    progress: Callable[[str], None],
) -> tuple[torch.nn.Module, torch.nn.Module, RecoveryReport]:
    """Prune ``module`` with Torch-Pruning and distil it back: (pruned, recovered, report)."""
    import torch
    import torch_pruning as tp

    missing = [n for n in names if n not in train.inputs]
    if missing:
        raise BadInputError(f"{train.source} lacks array(s) for model input(s) {', '.join(missing)}")
    size = pinned_batch(module) or 2  # a program that keeps its batch guard (nothing lifted) needs it
    example = [
        torch.from_numpy(np.resize(train.inputs[n], (size, *train.inputs[n].shape[1:]))) for n in names
    ]
    # A .pt2 program's aten calls as layers Torch-Pruning can see (refused if bound to its export batch).
    module = lift_for_training(module, [train.inputs[n] for n in names], names)
    teacher = copy.deepcopy(module).eval()
    progress(f"pruning {ratio:.0%} of channels with Torch-Pruning")
    pruned = prune_torch(module, ratio, example)
    student = copy.deepcopy(pruned)
    started = time.perf_counter()
    done, loss, device = recover(
        student, teacher, train, names, epochs=epochs, time_budget_s=time_budget_s, progress=progress
    )
    report = RecoveryReport(
        f"torch-pruning {getattr(tp, '__version__', '?')}", _params(module), _params(student), done,
        round(time.perf_counter() - started, 2), device, round(loss, 6), train.labels is not None,
    )  # fmt: skip
    return pruned, student, report
