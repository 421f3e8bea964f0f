"""A ``torch.export`` program's layers as modules again, so Torch-Pruning can prune a ``.pt2`` model.

``torch.export.load(...).module()`` runs the program as an FX graph of ``aten`` calls on loose
parameters (``aten.conv2d(x, features.0.weight, ...)``): there is no ``nn.Conv2d`` left for a
pruner to find, and its guards pin the batch size of the example it was exported with. This puts the
layers back: each ``aten.conv{1,2,3}d`` / ``aten.linear`` / ``aten.batch_norm`` call whose weights
belong to it alone becomes a call of an ``nn.Conv*d`` / ``nn.Linear`` / ``nn.BatchNorm*d`` holding
the same parameter objects, in the place of the container that held them (so state-dict names stay).
The result computes the same function; BatchNorm follows ``train()``/``eval()`` as a module does, which
recovery training needs. Calls it cannot lift (shared weights, a weight that is a buffer) stay as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgectl.compress.errors import BadInputError, describe

if TYPE_CHECKING:
    import torch
    from torch import fx


def has_layers(module: torch.nn.Module) -> bool:
    """True when ``module`` holds an ``nn.Linear`` or convolution a pruner can shrink."""
    import torch

    return any(isinstance(m, torch.nn.Linear | torch.nn.modules.conv._ConvNd) for m in module.modules())


def lift_for_training(
    module: torch.nn.Module, inputs: Sequence[np.ndarray], names: Sequence[str]
) -> torch.nn.Module:
    """``lift_layers``, refusing a program whose code is bound to the batch it was exported at."""
    pinned = pinned_batch(module)
    lifted = lift_layers(module)
    if pinned is not None and lifted is not module:  # nothing lifted: it keeps its guard, and no layer
        check_batch_free(lifted, pinned, inputs, names)
    return lifted


def lift_layers(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of an unlifted ``torch.export`` module with its layers as modules and no batch guard.

    Anything else (a plain ``nn.Module``, or a graph with nothing to lift) comes back as it was.
    """
    from torch import fx

    if not isinstance(module, fx.GraphModule) or has_layers(module):
        return module
    gm = _retied(module, copy.deepcopy(module))
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            lifted += _lift(gm, node)
    if not lifted:
        return module
    for node in list(gm.graph.nodes):
        # The program's guards check the example's shapes (batch 2 stays batch 2): training needs others.
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _retied(module: fx.GraphModule, copied: fx.GraphModule) -> fx.GraphModule:
    """``copied`` with the weights ``module`` ties one object again.

    A loaded program holds a tied weight as two Parameters on one storage, which deepcopy clones
    apart: the copy's parameter count (and any training) would treat them as two weights.
    """
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        key = (p.data_ptr(), tuple(p.shape))
        if key not in first:
            first[key] = name
            continue
        path, _, leaf = name.rpartition(".")
        setattr(copied.get_submodule(path), leaf, copied.get_parameter(first[key]))
    return copied


def _owner(gm: fx.GraphModule, args: list[Any], names: tuple[str, ...]) -> str | None:
    """The one container holding exactly these parameters (``names`` in order, None for absent ones)."""
    from torch import fx

    owner = None
    for arg, attr in zip(args, names, strict=True):
        if arg is None:
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr" or len(arg.users) != 1:
            return None  # a computed or shared weight: its layer cannot be a module of its own
        path, _, leaf = str(arg.target).rpartition(".")
        if leaf != attr or (owner is not None and path != owner) or not path:
            return None
        owner = path
    if owner is None:
        return None
    container = gm.get_submodule(owner)
    params = {n for n, _ in container.named_parameters(recurse=False)}
    held = params | {n for n, _ in container.named_buffers(recurse=False)}
    used = {a for arg, a in zip(args, names, strict=True) if arg is not None}
    extra = set(held) - used - {"num_batches_tracked"}
    # The layer replaces the container: one with modules of its own (a block with its own weight and
    # a child layer) would lose them, and a layer's weight and bias must be parameters (a fixed filter
    # registered as a buffer cannot be a Conv's weight).
    learnt = {a for a in used if a in ("weight", "bias")}
    if extra or next(container.children(), None) is not None or not learnt <= params:
        return None
    return owner


def _lift(gm: fx.GraphModule, node: fx.Node) -> int:
    import torch

    aten = torch.ops.aten
    convs = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
    # padding="same"/"valid" (an nn.Conv's string padding) is an overload of its own
    named = {aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
    args: list[Any] = list(node.args)
    if node.target in convs or node.target in named:
        dims = convs.get(node.target) or named[node.target]
        pad: Any = "valid" if node.target in named else [0] * dims
        full = args + [None, [1] * dims, pad, [1] * dims, 1][len(args) - 2 :]
        x, weight, bias, stride, padding, dilation, groups = full[:7]
        owner = _owner(gm, [weight, bias], ("weight", "bias"))
        if owner is None or node.kwargs:
            return 0
        shape = _weight_shape(gm, owner)
        kind: Any = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[dims - 1]
        layer: torch.nn.Module = kind(
            shape[1] * int(groups), shape[0], tuple(shape[2:]), stride=tuple(stride), dilation=tuple(dilation),
            padding=padding if isinstance(padding, str) else tuple(padding), groups=int(groups),
            bias=bias is not None,
        )  # fmt: skip
        return _replace(gm, node, owner, layer, x)
    if node.target == aten.linear.default:
        x, weight, bias = [*args, None][:3]
        owner = _owner(gm, [weight, bias], ("weight", "bias"))
        if owner is None or node.kwargs:
            return 0
        shape = _weight_shape(gm, owner)
        return _replace(gm, node, owner, torch.nn.Linear(shape[1], shape[0], bias=bias is not None), x)
    if node.target == aten.batch_norm.default and len(args) >= 8:
        x, weight, bias, mean, var, training, momentum, eps = args[:8]
        owner = _owner(gm, [weight, bias, mean, var], ("weight", "bias", "running_mean", "running_var"))
        if owner is None or mean is None or var is None:
            return 0
        features = _tensor_shape(gm, owner, "running_mean")[0]
        rank = _rank(x)
        norm: Any = (
            torch.nn.BatchNorm3d if rank == 5 else torch.nn.BatchNorm2d if rank == 4 else torch.nn.BatchNorm1d
        )
        # An eval export writes momentum=None (a cumulative average) as 0.0, which would freeze the
        # running statistics while recovery trains: None again, as the factory's layer has it.
        bn = norm(features, eps=float(eps), momentum=momentum or None, affine=weight is not None)
        return _replace(gm, node, owner, bn.train(bool(training)), x)
    return 0


def _tensor_shape(gm: fx.GraphModule, owner: str, name: str) -> list[int]:
    tensor: torch.Tensor = getattr(gm.get_submodule(owner), name)
    return [int(d) for d in tensor.shape]


def _weight_shape(gm: fx.GraphModule, owner: str) -> list[int]:
    return _tensor_shape(gm, owner, "weight")


def _rank(x: Any) -> int:
    val = getattr(x, "meta", {}).get("val")
    return int(val.dim()) if val is not None and hasattr(val, "dim") else 4


def _replace(gm: fx.GraphModule, node: fx.Node, owner: str, layer: torch.nn.Module, x: Any) -> int:
    """Give ``layer`` the owner's own parameter and buffer objects, put it in its place, call it.

    A BatchNorm comes in the mode the program ran it in (an eval export: running statistics)."""
    held = gm.get_submodule(owner)
    for name, param in held.named_parameters(recurse=False):
        setattr(layer, name, param)
    for name, buf in held.named_buffers(recurse=False):
        setattr(layer, name, buf)
    gm.set_submodule(owner, layer)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(owner, (x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return 1


def pinned_batch(module: torch.nn.Module) -> int | None:
    """The batch size an unlifted ``torch.export`` module was exported at without a dynamic batch
    dimension (its inputs' leading sizes, when they are one constant), else None."""
    from torch import fx

    if not isinstance(module, fx.GraphModule):
        return None
    vals = [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]
    sizes = [v.shape[0] for v in vals if getattr(v, "ndim", 0) > 0]  # a dynamic batch: a SymInt
    if not sizes or not all(isinstance(s, int) for s in sizes) or len(set(sizes)) != 1:
        return None
    return int(sizes[0])


def check_batch_free(
    lifted: torch.nn.Module, batch: int, inputs: Sequence[np.ndarray], names: Sequence[str]
) -> None:
    """Refuse a lifted program whose code still depends on the batch it was exported at.

    torch.export bakes that batch into the graph: ``x.view(x.size(0), -1)`` becomes ``view(2, -1)``, so
    without its guard the program mixes samples (or fails) at any other batch, and recovery trains at
    64. ``3 * batch`` samples at once must give what ``batch`` at a time gives (BatchNorm on running
    statistics in both), else this raises ``BadInputError``.
    """
    import torch

    probe = copy.deepcopy(lifted).eval()
    n = 3 * batch
    xs = [torch.from_numpy(np.ascontiguousarray(np.resize(a, (n, *a.shape[1:])))) for a in inputs]
    from torch.utils._pytree import tree_leaves

    def _outputs(out: Any) -> list[torch.Tensor]:
        return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

    problem = None
    with torch.no_grad():
        want = [_outputs(probe(*(x[i : i + batch] for x in xs))) for i in range(0, n, batch)]
        try:
            got = _outputs(probe(*xs))
        except Exception as exc:  # the program's code at a batch it was not exported for
            problem = describe(exc, 160)
        else:
            for i, out in enumerate(got):
                whole = torch.cat([w[i] for w in want]) if out.ndim else out
                if out.shape != whole.shape or not torch.allclose(out, whole, rtol=1e-4, atol=1e-5):
                    problem = f"output {i} at batch {n} is not its batch-{batch} outputs stacked"
                    break
    if problem is not None:
        raise BadInputError(
            f"this .pt2 was exported at batch {batch} without a dynamic batch, and its code depends on that "
            f"batch (torch.export turns x.view(x.size(0), -1) into view({batch}, -1)): recovery training "
            f"needs other batch sizes ({problem})",
            hint=f"export it again with dynamic_shapes={{'{names[0]}': {{0: torch.export.Dim('batch')}}}} "
            "(per input), pass the model as package.module:factory (+ --state-dict), or drop --train",
        )
