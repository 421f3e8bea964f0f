"""Why Torch-Pruning removed no channel from a model, as the error that says what to do instead.

``--prune`` on such a model cannot work as given (exit 2): it has no ``nn.Linear``/``nn.Conv`` layer
(an unlifted program), or every layer it has makes an output (a linear probe, a one-layer head),
whose width pruning must keep, or its layers feed ops the dependency graph cannot follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgectl.compress.errors import NothingToPruneError

if TYPE_CHECKING:
    import torch


def nothing_removed(
    module: torch.nn.Module,
    heads: Sequence[torch.nn.Module],
    ratio: float,
    example: Sequence[torch.Tensor],
) -> NothingToPruneError:
    """The refusal for a ``module`` Torch-Pruning left whole at ``ratio`` (``heads``: the layers it
    kept for the outputs ``module(*example)`` gives)."""
    import torch
    from torch.utils._pytree import tree_leaves

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    layers = [m for m in module.modules() if isinstance(m, kinds)]
    head_names = {id(h) for h in heads}
    what = f"Torch-Pruning found no channel it could remove from this model at ratio {ratio}"
    if not layers:
        # Torch-Pruning follows nn.Module layers; a program with none it can see "prunes" nothing and
        # the table would claim a ratio never applied.
        core = _core_aten(module)
        if core:
            return NothingToPruneError(
                f"{what}: this .pt2 was saved after run_decompositions() (it calls {', '.join(core)}), "
                "whose layers cannot be made nn.Linear/nn.Conv layers again",
                hint="save the program torch.export.export returns (before run_decompositions()), or "
                "pass the model as package.module:factory (+ --state-dict)",
            )
        return NothingToPruneError(
            f"{what}: it has no nn.Linear/nn.Conv layer to prune (a .pt2's calls on a weight that two "
            "calls share stay aten calls)",
            hint="pass it as package.module:factory (+ --state-dict) so its nn.Linear/nn.Conv layers "
            "can be pruned, or as ONNX to prune on the graph",
        )
    with torch.no_grad():
        outs = [t for t in tree_leaves(module(*example)) if isinstance(t, torch.Tensor) and t.ndim]
    widths = {int(o.shape[-1]) for o in outs} | {int(o.shape[1]) for o in outs if o.ndim >= 3}

    def width(m: torch.nn.Module) -> int:
        return int(getattr(m, "out_features", getattr(m, "out_channels", -1)))

    # Heads in name only (the last layer, kept when no output shows its width) are not this case.
    if all(id(m) in head_names and width(m) in widths for m in layers):
        # A linear probe or a single head: the factory or layer hint would ask for what was given.
        names = ", ".join(n or "(the model)" for n, m in module.named_modules() if id(m) in head_names)
        return NothingToPruneError(
            f"{what}: its only nn.Linear/nn.Conv layer(s) ({names}) compute the model's outputs, whose "
            "width pruning keeps, so there is nothing to prune",
            hint="drop --prune (quantization still applies)",
        )
    # Layers it sees but may not shrink: layers feeding an op it cannot trace (an einsum with a raw
    # Parameter, a functional conv).
    return NothingToPruneError(
        f"{what}: its {len(layers)} nn.Linear/nn.Conv layer(s) are output heads or feed ops it cannot "
        "trace (an einsum or matmul with a raw nn.Parameter, a functional conv)",
        hint="use nn.Linear/nn.Conv modules for those weights, pass the model as ONNX to prune on the "
        "graph, or drop --prune",
    )


def _core_aten(module: torch.nn.Module) -> list[str]:
    """The core-ATen layer ops a decomposed program runs (``aten.convolution``, ``aten.addmm``...)."""
    from torch import fx

    if not isinstance(module, fx.GraphModule):
        return []
    core = ("aten.convolution.", "aten.addmm.", "aten._native_batch_norm_legit")
    calls = {str(n.target) for n in module.graph.nodes if n.op == "call_function"}
    return sorted({c.rsplit(".", 1)[0] for c in calls if c.startswith(core)})
