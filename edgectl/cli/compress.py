"""``edgectl compress``: a PyTorch/ONNX model in, a pruned, quantized, evaluated, signed artifact out.

Example:
    edgectl compress model.onnx --profile x86-cpu-vnni --calib calib.npz --eval eval.npz \\
        --max-drop 0.005 -o out/model-v1
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgectl.cli.output import console, err_console, print_json
from edgectl.errors import EdgectlError


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def trial_table(rows: list[dict[str, Any]], *, baseline: dict[str, Any] | None = None) -> Table:
    """The comparison table: every model built, its quality, drop, latency, size and verdict."""
    base = baseline or (rows[0] if rows else {})
    table = Table(title="what was tried", show_lines=False)
    for col in ("model", "quality", "drop", "min cos", "p50 ms", "speed", "MB", "smaller", "ok", "note"):
        table.add_column(col, justify="left" if col in ("model", "note") else "right")
    for r in rows:
        speed = base.get("p50_ms") / r["p50_ms"] if r.get("p50_ms") and base.get("p50_ms") else None
        smaller = (
            base.get("size_bytes") / r["size_bytes"]
            if r.get("size_bytes") and base.get("size_bytes")
            else None
        )
        ok = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.get("passed")]
        table.add_row(
            Text(r["name"]), _fmt(r.get("quality"), ".4f"), _fmt(r.get("drop"), "+.4f"), _fmt(r.get("min_cosine"), ".4f"),
            _fmt(r.get("p50_ms"), ".3f"), _fmt(speed, ".2f") + ("x" if speed else ""),
            _fmt(r["size_bytes"] / 1e6 if r.get("size_bytes") else None, ".3f"),
            _fmt(smaller, ".2f") + ("x" if smaller else ""), ok, Text(r.get("note", "")),
        )  # fmt: skip
    return table


def _stage_printer() -> Callable[[str], None]:
    """Stage lines with the time since the start, for stderr that is not a terminal."""
    start = time.monotonic()

    def show(msg: str) -> None:
        # A Text, not markup: "recovering [####....]" read as a style tag and the bar vanished.
        err_console.print(
            Text(f"compress [{time.monotonic() - start:5.1f}s] {msg}"), highlight=False, soft_wrap=True
        )

    return show


def _show(target: Console, table: Table) -> None:
    # Logs and pipes have no width: do not squeeze the table to 80 columns there.
    out = target if target.is_terminal else Console(file=target.file, width=180, color_system=None)
    out.print(table)


def _error(exc: Exception) -> None:
    # A Text, not markup: messages quote user text (``masked-cosine:mask:`` became an emoji, a ``[/x]`` broke).
    err_console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)


def _notes(notes: list[str]) -> None:
    for note in notes:
        err_console.print(Text.assemble(("note: ", "yellow"), note), soft_wrap=True)


def _profile_name(profile: str | None) -> str:
    if profile:
        return profile
    from edgectl.devices import detect

    try:
        return detect().profile.name
    except EdgectlError:
        return "x86-cpu-avx2"


def compress(
    model: Annotated[
        str, typer.Argument(help="model.onnx, model.pt2 (torch.export), or package.module:factory")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Artifact directory to create (must not exist).")],
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="Target device profile (default: this machine's).")
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            "-q",
            help="auto (measure every mode the profile runs) | int8-static | int8-dynamic | int8-weight | int4-weight | fp16 | none",
        ),
    ] = "auto",
    prune: Annotated[
        str,
        typer.Option(
            "--prune",
            help="Fraction of channels to remove, 0 to <1, or auto (the largest that meets the budget).",
        ),
    ] = "0",
    calib: Annotated[
        Path | None, typer.Option("--calib", help="Calibration samples (.npz, one array per input).")
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval", help="Evaluation samples (.npz, + optional 'labels' for top-1).")
    ] = None,
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="Absolute quality budget: top-1 points/100 or 1-cosine.")
    ] = 0.01,
    name: Annotated[
        str | None, typer.Option("--name", help="Artifact name (default: the model file's stem).")
    ] = None,
    version: Annotated[int, typer.Option("--version", help="Artifact version, a positive integer.")] = 1,
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help="Ed25519 private key (default: your default key).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe YAML (overrides --quantize/--prune).")
    ] = None,
    state_dict: Annotated[
        Path | None, typer.Option("--state-dict", help="Weights for a package.module:factory model.")
    ] = None,
    train: Annotated[
        Path | None,
        typer.Option(
            "--train",
            help="Training samples (.npz, one array per input, + optional 'labels'): after --prune, a torch "
            "model is distilled from the float one to recover accuracy.",
        ),
    ] = None,
    finetune_epochs: Annotated[
        int | None,
        typer.Option(
            "--finetune-epochs",
            help="At most this many recovery epochs with --train (10 when not given; "
            "10 minutes bound them too).",
            min=1,
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            help="Quality metric: top1 | cosine | masked-cosine:INPUT | module:function, a "
            "function(inputs, reference_outputs, outputs) -> float, higher is better "
            "(default: top1 with labels, else cosine).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Compress a model for a device: export, clean up, prune, quantize, evaluate, gate, sign.

    Every mode and format the target runs is built, scored with the metric and
    timed on the target's execution provider; the fastest model inside --max-drop
    is kept, with --quantize auto only if it is faster than the float model.
    Otherwise nothing is written and it exits non-zero with the table of what was tried.

    Example: edgectl compress model.onnx --calib calib.npz --eval eval.npz -o out/m-v1
    """
    from edgectl.compress.errors import BadInputError, QualityGateError
    from edgectl.compress.pipeline import CompressRequest, run
    from edgectl.compress.recipe import Recipe

    try:
        if finetune_epochs is not None and train is None:
            # Without --train nothing trains: the epochs were ignored without a word.
            raise BadInputError(
                "--finetune-epochs sets how long --train recovers a pruned model, and no --train was given",
                hint="add --train FILE.npz (with --prune), or drop --finetune-epochs",
            )
        plan = (
            Recipe.load(recipe)
            if recipe
            else Recipe.from_options(quantize=quantize, prune=prune, finetune_epochs=finetune_epochs)
        )
        request = CompressRequest(
            model=model, out_dir=out, profile=_profile_name(profile), recipe=plan, calib=calib, eval=eval_data,
            max_drop=max_drop, name=name, version=version, sign_key=sign_key, state_dict=state_dict, metric=metric,
            train=train,
        )  # fmt: skip
        if as_json:
            result = run(request)
        elif not err_console.is_terminal:
            result = run(request, _stage_printer())  # a log or CI: one line per stage, not a spinner
        else:
            with err_console.status("compressing", spinner="dots") as status:
                result = run(
                    request, lambda msg: status.update(Text.assemble(("compress", "bold"), " ", msg))
                )
    except QualityGateError as exc:
        if as_json:
            print_json({"ok": False, "error": str(exc), "notes": exc.notes, "trials": exc.trials})
        else:
            _notes(exc.notes)
            _show(err_console, trial_table(exc.trials))
            _error(exc)
        raise typer.Exit(exc.exit_code) from None
    except EdgectlError as exc:
        if as_json:
            print_json({"ok": False, "error": str(exc)})
        else:
            _error(exc)
        raise typer.Exit(exc.exit_code) from None
    rows = [t.to_dict() for t in result.trials]
    if as_json:
        print_json(
            {
                "ok": True,
                "artifact": str(result.out_dir),
                "digest": result.digest,
                "metrics": result.metrics,
                "notes": result.notes,
                "stages": result.stages,
            }
        )
        return
    _notes(result.notes)
    _show(console, trial_table(rows))
    m = result.metrics
    console.print(
        f"[green]wrote[/] {result.out_dir}  digest {result.digest}\n"
        f"  {result.chosen.name}: {m['quality_metric']} {m['compressed_quality']:.4f} "
        f"(float {m['baseline_quality']:.4f}, drop {m['quality_drop']:+.4f} <= {m['max_drop']}), "
        f"{m['speedup']}x faster, {m['size_ratio']}x smaller, in {result.seconds:.1f}s",
        highlight=False,
        soft_wrap=True,  # the digest stays on its line for scripts that read it
    )
    from edgectl.compress.clock import breakdown_lines

    console.print("where the time went (wall, share, CPU):", highlight=False)
    for line in breakdown_lines(result.stages, result.seconds):
        console.print(f"  {line}", highlight=False)
    if m["speedup"] is not None and m["speedup"] < 1.0:
        err_console.print(
            f"[yellow]warning:[/] {result.chosen.name} is slower than the float model on this execution provider; "
            "--quantize auto writes only a model faster than the float one",
            soft_wrap=True,
        )
