"""`edgectl compress` end to end on the tiny CNN: the artifact, the gate, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edgectl.artifact import default_trust_store, load_artifact, verify_bundle
from edgectl.cli.compress import compress

app = typer.Typer()
app.command()(compress)


@app.callback()
def _root() -> None:
    """Test harness: the command as the CLI root will mount it."""


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["compress", *map(str, args)])
    return result.exit_code, result.output


def test_compress_digits_int8_end_to_end(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    code, text = invoke(
        digits["onnx"], "--profile", "x86-cpu-vnni", "--quantize", "int8-static", "--calib", digits["calib"],
        "--eval", digits["eval"], "--max-drop", "0.02", "--name", "digits", "--version", "3", "-o", out, "--json",
    )  # fmt: skip
    assert code == 0, text
    doc = json.loads(text)
    m = doc["metrics"]
    assert m["quality_metric"] == "top1" and m["baseline_quality"] > 0.8
    assert m["quality_drop"] <= 0.02 and m["size_ratio"] > 2.5
    assert m["latency_ms"] > 0 and m["baseline_latency_ms"] > 0
    names = {t["name"] for t in m["trials"]}
    assert any("QDQ U8S8" in n for n in names) and any("QOperator" in n for n in names)
    assert any(t["note"].startswith("ORT defaults") for t in m["trials"])
    verified = verify_bundle(out, default_trust_store())  # signed with the default key made on first use
    manifest = verified.manifest
    assert manifest.name == "digits" and manifest.version == 3 and manifest.target_profile == "x86-cpu-vnni"
    assert "int8" in manifest.precision.values()
    assert manifest.recipe["recipe"]["passes"][0] == {
        "cleanup": {
            "optimize": True,
            "symbolic_shapes": True,
            "fuse_transformer": True,
            "residual_unfused": True,
        }
    }
    assert manifest.recipe["cleanup"]["fused"] == {}  # a CNN has no transformer patterns
    assert manifest.recipe["tensorrt"]["build_on_device"] is False
    assert manifest.engine_build_on_device
    # The calibration inputs' summary rides in the bundle, signed, for the agents' drift score.
    summary = load_artifact(out, default_trust_store()).input_summary()
    assert summary is not None and [i.name for i in summary.inputs] == ["image"]
    assert summary.inputs[0].count == np.load(digits["calib"])["image"].shape[0]


def test_compress_factory_with_pruning_and_rich_table(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a"
    code, text = invoke(
        "edgectl.compress.digits:DigitsCNN", "--state-dict", digits["weights"], "--profile", "x86-cpu-vnni", "--prune", "0.25",
        "--quantize", "int8-dynamic", "--eval", digits["eval"], "--max-drop", "0.05", "-o", out,
    )  # fmt: skip
    assert code == 0, text
    assert "what was tried" in text and "pruned 25%" in text and "wrote" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["export"]["exporter"] == "dynamo"
    assert manifest["recipe"]["prune"]["channels_after"] < manifest["recipe"]["prune"]["channels_before"]
    assert manifest["metrics"]["macs"] < manifest["metrics"]["baseline_macs"]


def test_impossible_budget_writes_nothing_and_shows_the_table(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "never"
    # Random calibration data: activations ranges that do not match the real inputs at all.
    bad = tmp_path / "noise.npz"
    np.savez(bad, image=np.random.default_rng(0).normal(0, 50, (16, 1, 8, 8)).astype(np.float32))
    code, text = invoke(
        digits["onnx"], "--profile", "x86-cpu-vnni", "--quantize", "int8-static", "--calib", bad,
        "--eval", digits["eval"], "--max-drop", "0", "-o", out,
    )  # fmt: skip
    assert code == 4, text
    assert "no candidate met --max-drop 0" in text and "what was tried" in text
    assert "kept float" in text and "ORT defaults" in text and "percentile" in text
    assert not out.exists() and not list(tmp_path.glob(".never*"))


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (
            # Two arrays, neither named after the input: ambiguous (one array alone is accepted).
            lambda d: np.savez(d / "x.npz", pixels=np.zeros((4, 1, 8, 8), np.float32), more=np.zeros(4)),
            ["--eval", "x.npz"],
            "lacks array",
        ),
        (
            lambda d: np.savez(d / "x.npz", image=np.zeros((4, 1, 8, 8))),
            ["--eval", "x.npz"],
            "float64 but the model input is float32",
        ),
        (
            lambda d: np.savez(d / "x.npz", image=np.zeros((4, 1, 9, 9), np.float32)),
            ["--calib", "x.npz"],
            "the model needs 8",
        ),
        (lambda d: (d / "x.npz").write_text("not a zip"), ["--eval", "x.npz"], "not a numpy .npz"),
        (lambda d: None, ["--max-drop", "-0.1"], "--max-drop must be >= 0"),
        # nan failed every gate after the whole run (exit 4); inf failed writing the manifest's JSON.
        (lambda d: None, ["--max-drop", "nan"], "--max-drop must be >= 0 and finite, got nan"),
        (lambda d: None, ["--max-drop", "inf"], "--max-drop must be >= 0 and finite, got inf"),
        (lambda d: None, ["--quantize", "int4"], "--quantize must be one of"),
        (lambda d: None, ["--profile", "toaster"], "unknown device profile"),
        (lambda d: None, ["--quantize", "fp16"], "no execution provider with fp16"),
    ],
)
def test_bad_input_is_one_clear_line(digits: dict[str, Path], tmp_path: Path, make, args, message) -> None:  # type: ignore[no-untyped-def]
    make(tmp_path)
    args = [str(tmp_path / a) if a.endswith(".npz") else a for a in args]
    if "--profile" not in args:
        args += ["--profile", "x86-cpu-vnni"]
    out = tmp_path / "out"
    code, text = invoke(digits["onnx"], *args, "-o", out)
    assert code != 0 and message in text, text
    assert len(text.strip().splitlines()) <= 3  # one error (rich may wrap it), no traceback
    assert not out.exists()


def test_non_model_file_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    code, text = invoke(junk, "--profile", "x86-cpu-vnni", "-o", tmp_path / "out")
    assert code == 2 and "not a readable ONNX model" in text


def test_existing_output_is_not_overwritten(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = invoke(digits["onnx"], "--profile", "x86-cpu-vnni", "-o", out)
    assert code == 2 and "not empty" in text and (out / "keep.txt").read_text() == "mine"


def test_onnx_with_its_weights_in_a_data_file(digits: dict[str, Path], tmp_path: Path) -> None:
    """torch.onnx.export's default (dynamo) exporter writes ``model.onnx`` + ``model.onnx.data``:
    both must travel into the artifact, and a missing data file is one clear line, exit 2."""
    import onnx

    src = tmp_path / "src"
    src.mkdir()
    model = onnx.load(str(digits["onnx"]))
    onnx.save_model(
        model, str(src / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    assert (src / "m.onnx.data").stat().st_size > (src / "m.onnx").stat().st_size
    out = tmp_path / "out"
    code, text = invoke(
        src / "m.onnx", "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval", digits["eval"],
        "--max-drop", "0.05", "-o", out, "--json",
    )  # fmt: skip
    assert code == 0, text
    assert json.loads(text)["metrics"]["baseline_quality"] > 0.8  # the real weights, not zeros
    verify_bundle(out, default_trust_store())
    (src / "m.onnx.data").unlink()
    code, text = invoke(
        src / "m.onnx", "--profile", "x86-cpu-vnni", "--eval", digits["eval"], "-o", tmp_path / "o2"
    )
    assert code == 2 and "not a readable ONNX model" in text and "m.onnx.data" in text, text
    assert not (tmp_path / "o2").exists()


def test_a_log_gets_stage_lines_and_an_unwrapped_digest(digits: dict[str, Path], tmp_path: Path) -> None:
    """Not on a terminal (CI, a log file) the spinner is replaced by one line per stage, and the
    digest stays on the 'wrote' line whatever the width."""
    out = tmp_path / "a"
    code, text = invoke(
        digits["onnx"], "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval", digits["eval"],
        "--max-drop", "0.05", "-o", out,
    )  # fmt: skip
    assert code == 0, text
    stages = [line for line in text.splitlines() if line.startswith("compress [")]
    assert any("scoring the float model" in s for s in stages) and any("timing" in s for s in stages), text
    digest = verify_bundle(out, default_trust_store()).digest
    assert any(line.startswith(f"wrote {out}") and digest in line for line in text.splitlines()), text


def test_a_shape_hint_names_no_exporter_symbols() -> None:
    """The dynamo exporter names a free batch dim 's10'; the hint says (N, 16) instead."""
    from edgectl.artifact import TensorSpec
    from edgectl.compress.data import check_samples
    from edgectl.compress.errors import BadInputError

    inputs = [TensorSpec("meta", "float32", ("s10", 16, "s7"))]
    with pytest.raises(BadInputError) as err:
        check_samples(
            {"meta": np.zeros((4, 8, 3), np.float32)}, None, inputs, source="calibration file c.npz"
        )
    assert "has 8 on axis 1, the model needs 16" in str(err.value)
    assert err.value.hint == "reshape the samples to (N, 16, any)"
