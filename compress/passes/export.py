"""Export a torch model to ONNX with a dynamic batch, then prove the ONNX computes the same thing.

The dynamo exporter is tried first (it is torch's supported path); when it cannot capture the
model (data-dependent control flow, unsupported ops) the TorchScript exporter is tried. Either way
ORT's outputs must match torch's at the example batch and at batch one before any pass runs.
torch is imported here and only here, so compressing an ONNX file never needs it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgectl.compress.errors import BadInputError, ExportError, ParityError, describe
from edgectl.compress.graph import cpu_session
from edgectl.compress.user_code import import_user_module

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ExportConfig:
    """Which exporter to use (``auto`` tries dynamo, then TorchScript), the opset and parity tolerances."""

    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    opset: int = 18
    rtol: float = 1e-3
    atol: float = 1e-4


@dataclass(frozen=True)
class ExportReport:
    """Which exporter produced the ONNX file, and how closely ORT matched torch."""

    path: Path
    exporter: str
    max_abs_diff: float
    min_cosine: float
    dynamo_error: str | None = None


def load_factory(spec: str, state_dict: Path | None = None) -> torch.nn.Module:
    """Build a module from ``package.module:factory`` and load an optional state dict into it."""
    import torch

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise BadInputError(f"{spec!r} is not package.module:factory", hint="e.g. mypkg.models:build_net")
    try:
        factory = getattr(import_user_module(mod_name), attr)
    except Exception as exc:  # ImportError, AttributeError, a SyntaxError, the module's own import-time error
        raise BadInputError(
            f"cannot import {spec}: {describe(exc)}",
            hint="check the module is in the current directory or on PYTHONPATH and imports cleanly",
        ) from exc
    if not callable(factory):
        raise BadInputError(f"{spec} is a {type(factory).__name__}, not a function", hint="name a factory")
    try:
        module = factory()
    except Exception as exc:  # the user's code: any failure is theirs to fix, said in one line
        raise BadInputError(
            f"{spec}() raised {describe(exc)}", hint="the factory is called with no arguments"
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise BadInputError(f"{spec} returned {type(module).__name__}, not a torch.nn.Module")
    if state_dict is not None:
        try:
            state = torch.load(str(state_dict), map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as exc:
            raise BadInputError(
                # Every line: torch lists the missing and unexpected keys after the first one.
                f"cannot load state dict {state_dict}: {type(exc).__name__}: {str(exc).strip()}",
                hint=f"save it with torch.save(model.state_dict(), path) from the model {spec}() builds",
            ) from exc
    return module.eval()


def load_program(path: Path) -> tuple[torch.nn.Module, list[str], Any]:
    """Load a ``torch.export`` ``.pt2`` file: the runnable module, its input names and the program."""
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise BadInputError(f"{path} is not a torch.export .pt2 file ({type(exc).__name__}: {exc})") from exc
    names = [
        s.arg.name
        for s in program.graph_signature.input_specs
        if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    training = _training_ops(program)
    if training:
        raise BadInputError(
            f"{path} was exported in train() mode: its {', '.join(training)} run as in training (batch "
            "statistics, random dropout), so it is not the model that serves",
            hint="call model.eval() before torch.export.export and save the program again",
        )
    return program.module(), names, program


def _training_ops(program: Any) -> list[str]:
    """The kinds of op a ``torch.export`` program runs in their training form (an export in train())."""
    import torch

    aten = torch.ops.aten
    found = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.batch_norm.default and len(node.args) > 5 and node.args[5] is True:
            found.add("BatchNorm")
        elif node.target == aten.dropout.default and len(node.args) > 2 and node.args[2] is True:
            found.add("Dropout")
    return sorted(found)


def input_names(module: torch.nn.Module, given: Collection[str] = ()) -> list[str]:
    """The model's input names: the parameters of ``forward``, in order, up to the first one with a
    default that ``given`` (the sample arrays' names) lacks; that one and those after keep their defaults."""
    params = inspect.signature(module.forward).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names: list[str] = []
    for i, p in enumerate(positional):
        if p.default is not p.empty and p.name not in given:
            # forward(input_ids, attention_mask=None, token_type_ids=None, ...): optional inputs the data
            # leaves out are not inputs (a flag like return_dict never could be one).
            later = [q.name for q in positional[i + 1 :] if q.name in given]
            if later:
                raise BadInputError(
                    f"the sample data has {', '.join(later)} but not {p.name}, which forward() takes before it",
                    hint=f"save {p.name} too, or wrap the model so its forward() takes the inputs you have",
                )
            break
        names.append(p.name)
    if not names and any(p.kind == p.VAR_POSITIONAL for p in params):
        # forward(self, *inputs): nothing names the inputs but the data; one array is unambiguous.
        if len(given) == 1:
            return list(given)
        raise BadInputError(
            f"forward() takes *args, so its inputs have no names to match the sample arrays "
            f"({', '.join(given) or 'none'}) against",
            hint="name forward()'s parameters (def forward(self, x, mask)), or save a single array",
        )
    return names


def _example(
    arrays: dict[str, np.ndarray], names: list[str], fixed: int | None = None
) -> dict[str, np.ndarray]:
    if fixed:  # a program exported without a dynamic batch runs its example's batch size only
        return {n: np.resize(arrays[n], (fixed, *arrays[n].shape[1:])) for n in names}
    # Batch 1 lets torch.export specialise the batch dim to a constant; use at least two samples.
    ex = {n: arrays[n][:4] for n in names}
    return {n: (np.concatenate([a, a]) if a.shape[0] < 2 else a) for n, a in ex.items()}


def program_batch(program: Any, names: list[str]) -> int | None:
    """The batch size a ``torch.export`` program pins (its example's, when exported without a dynamic
    batch dimension), or None where the batch is dynamic or there is no program."""
    if program is None:
        return None
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    sizes = {
        v.shape[0]
        for name in names
        if (v := vals.get(name)) is not None and getattr(v, "ndim", 0) > 0 and isinstance(v.shape[0], int)
    }
    return sizes.pop() if len(sizes) == 1 else None


def _flat(out: Any) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [o.detach().numpy() for o in out if isinstance(o, torch.Tensor)]


def _output_names(returned: Any, count: int) -> list[str]:
    """A dict of tensors names its outputs by its keys (what the user's code calls them); any other
    return is ``output`` or ``output_0``, ``output_1``, ..."""
    import torch

    if (
        isinstance(returned, dict)
        and len(returned) == count
        and all(isinstance(k, str) and k and isinstance(v, torch.Tensor) for k, v in returned.items())
    ):
        return list(returned)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def export_module(
    module: torch.nn.Module,
    arrays: dict[str, np.ndarray],
    out: Path,
    *,
    names: list[str] | None = None,
    program: Any = None,
    config: ExportConfig | None = None,
) -> ExportReport:
    """Export ``module`` (or its ``torch.export`` ``program``) to ``out`` and check parity with ORT."""
    import torch

    cfg = config or ExportConfig()
    names = names or input_names(module, arrays)
    if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}  # one input, one array: no ambiguity
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadInputError(
            f"the sample data lacks the model input(s) {', '.join(missing)}",
            hint=f"name the npz arrays after forward()'s parameters: {', '.join(names)}",
        )
    fixed = program_batch(program, names)
    example = _example(arrays, names, fixed)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    try:
        with torch.no_grad(), plain_attention():
            returned = module(*args)
    except Exception as exc:  # the user's forward() on the user's arrays (float64 from numpy, most often)
        given = ", ".join(f"{n} {example[n].dtype} {example[n].shape[1:]}" for n in names)
        raise BadInputError(
            f"the model's forward() fails on the sample data ({given} per sample): {describe(exc, 200)}",
            hint="save the arrays in the dtype and shape forward() expects, e.g. x.astype(numpy.float32)",
        ) from exc
    expected = _flat(returned)
    outputs = _output_names(returned, len(expected))
    dynamo_error: str | None = None
    exporter = "torchscript"
    if cfg.exporter in ("auto", "dynamo"):
        try:
            _dynamo(program if program is not None else module, args, names, outputs, out, cfg)
            exporter = "dynamo"
        except Exception as exc:  # the dynamo exporter raises many types; all mean "try the other one"
            dynamo_error = describe(exc)
            if cfg.exporter == "dynamo":
                raise ExportError(f"dynamo export failed: {dynamo_error}") from exc
    if exporter != "dynamo":
        try:
            _torchscript(module, args, names, outputs, out, cfg)
        except Exception as exc:
            raise ExportError(
                f"both exporters failed; dynamo: {dynamo_error}; torchscript: {type(exc).__name__}: {exc}",
                hint="export the model to ONNX yourself and pass the .onnx file",
            ) from exc
    diff, cos = check_parity(module, out, example, names, cfg, fixed_batch=fixed is not None)
    return ExportReport(out, exporter, diff, cos, dynamo_error)


def _dynamo(
    model: Any, args: tuple[Any, ...], names: list[str], outputs: list[str], out: Path, cfg: ExportConfig
) -> None:
    import torch

    # The exporter warns about every optional op library (torchvision, ...) it does not find.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Its constant folder logs "Evaluation failed" for each node it leaves unfolded (e.g. a reshape
    # of the dynamic batch): harmless, and the parity check below judges the result anyway.
    logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1)
    dynamic = None if isinstance(model, torch.export.ExportedProgram) else {n: {0: batch} for n in names}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(out),
            dynamo=True,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=dynamic,
            opset_version=cfg.opset,
            external_data=False,
            verbose=False,
        )


def _torchscript(
    module: Any, args: tuple[Any, ...], names: list[str], outputs: list[str], out: Path, cfg: ExportConfig
) -> None:
    import torch

    axes = {n: {0: "batch"} for n in [*names, *outputs]}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(out),
            dynamo=False,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=min(cfg.opset, 17),
        )


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """torch's attention without its inference fast path, the path an exported graph computes.

    In eval mode without grad, nn.TransformerEncoder turns a padding mask into nested tensors and
    answers 0 at padded tokens, where the graph (the plain path) computes values: every export of an
    encoder with a padding mask failed parity there.
    """
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def check_parity(
    module: torch.nn.Module,
    path: Path,
    example: dict[str, np.ndarray],
    names: list[str],
    cfg: ExportConfig,
    *,
    fixed_batch: bool = False,
) -> tuple[float, float]:
    """Compare ORT with torch at the example batch and at batch one (unless the batch is fixed);
    raise ParityError on mismatch."""
    import torch

    session = cpu_session(path, threads=0)
    worst_diff, worst_cos = 0.0, 1.0
    feeds = [example] if fixed_batch else [example, {n: a[:1] for n, a in example.items()}]
    for feed in feeds:
        with torch.no_grad(), plain_attention():
            want = _flat(module(*(torch.from_numpy(feed[n]) for n in names)))
        try:
            got = session.run(None, feed)
        except Exception as exc:
            raise ParityError(
                f"the exported model does not run at batch {feed[names[0]].shape[0]}: {exc}"
            ) from exc
        for w, g in zip(want, got, strict=True):
            g = np.asarray(g)
            if w.shape != g.shape:
                raise ParityError(f"exported output shape {g.shape} differs from torch's {w.shape}")
            diff = float(np.abs(w.astype(np.float64) - g).max()) if w.size else 0.0
            den = float(np.linalg.norm(w) * np.linalg.norm(g))
            cos = float((w.ravel().astype(np.float64) @ g.ravel()) / den) if den > 0 else 1.0
            worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
            if not np.allclose(
                g, w, rtol=cfg.rtol, atol=cfg.atol + cfg.rtol * float(np.abs(w).max(initial=0))
            ):
                raise ParityError(
                    f"ONNX output differs from torch by up to {diff:.3g} (cosine {cos:.6f})",
                    hint="check the model is in eval() mode and uses no randomness in forward()",
                )
    return worst_diff, worst_cos
