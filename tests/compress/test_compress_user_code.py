"""The user's ``module:function`` (a model factory, a metric): found as ``python -m`` finds it, and
every way its import can fail is one line naming it, exit 2, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.compress.test_compress_cli import invoke


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory; sys.path and sys.modules are restored after the test."""
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(here))])
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    return here


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('raise RuntimeError("no GPU here")\n', "cannot import mymodels_a:build: RuntimeError: no GPU here"),
        ("def build(:\n", "cannot import mymodels_a:build: SyntaxError"),
    ],
)
def test_a_factory_module_that_fails_on_import_is_one_line_not_a_traceback(
    cwd: Path, source: str, message: str
) -> None:
    # A module raising at import (anything but ImportError) ended in a traceback and exit 1.
    (cwd / "mymodels_a.py").write_text(source)
    np.savez(cwd / "d.npz", x=np.zeros((4, 16), np.float32))
    code, text = invoke("mymodels_a:build", "--eval", cwd / "d.npz", "-o", cwd / "out")
    assert code == 2, text
    assert message in " ".join(text.split()) and "Traceback" not in text
    assert not (cwd / "out").exists()


def test_a_factory_beside_the_user_is_found_without_pythonpath(cwd: Path) -> None:
    # `edgectl compress mymodels:build` in the folder holding mymodels.py said "No module named 'mymodels'".
    (cwd / "mymodels_b.py").write_text('def build():\n    raise RuntimeError("reached the factory")\n')
    np.savez(cwd / "d.npz", x=np.zeros((4, 16), np.float32))
    code, text = invoke("mymodels_b:build", "--eval", cwd / "d.npz", "-o", cwd / "out")
    assert code == 2, text
    assert "mymodels_b:build() raised RuntimeError: reached the factory" in " ".join(text.split())


def test_a_metric_beside_the_user_is_found_without_pythonpath(
    cwd: Path, tiny_onnx: Path, images: np.ndarray
) -> None:
    (cwd / "mymetric_c.py").write_text(
        "import numpy as np\n\n\ndef agree(inputs, reference, outputs):\n"
        "    return float((reference[0].argmax(1) == outputs[0].argmax(1)).mean())\n"
    )
    np.savez(cwd / "eval.npz", image=images)
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval",
                        cwd / "eval.npz", "--metric", "mymetric_c:agree", "--max-drop", "1.0", "-o", cwd / "out",
                        "--json")  # fmt: skip
    assert code == 0, text
    assert json.loads(text)["metrics"]["quality_metric"] == "mymetric_c:agree"


def test_a_forward_with_optional_parameters_takes_only_the_inputs_the_data_has(tmp_path: Path) -> None:
    # forward(pixel_values, mask=None, return_dict=False) asked for arrays named mask and return_dict.
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    out = tmp_path / "out"
    code, text = invoke("tests.compress.model_factories:optional_inputs", "--eval", tmp_path / "d.npz",
                        "--quantize", "none", "--max-drop", "1", "-o", out, "--json")  # fmt: skip
    assert code == 0, text
    assert json.loads(text)["notes"] == [
        "evaluation file d.npz: used its only array 'x' for the model input 'pixel_values'"
    ]
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert [i["name"] for i in inputs] == ["pixel_values"]


def test_an_optional_input_after_one_the_data_lacks_is_named() -> None:
    from edgectl.compress.errors import BadInputError
    from edgectl.compress.passes.export import input_names
    from tests.compress.model_factories import optional_inputs

    net = optional_inputs()
    assert input_names(net, ["pixel_values", "mask"]) == ["pixel_values", "mask"]
    with pytest.raises(BadInputError, match="has return_dict but not mask, which forward"):
        input_names(net, ["pixel_values", "return_dict"])


def test_sample_arrays_forward_cannot_take_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    # numpy's default float64 into a float32 torch model: "Input type (double) and bias type (float)"
    # came out of the export as a traceback, exit 1 (an ONNX model gets a clear dtype error for the same).
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 16)))
    out = tmp_path / "out"
    code, text = invoke(
        "tests.compress.model_factories:optional_inputs", "--eval", tmp_path / "d.npz", "-o", out
    )
    flat = " ".join(text.split())
    assert code == 2, text
    assert "the model's forward() fails on the sample data (pixel_values float64 (16,) per sample)" in flat
    assert "Traceback" not in text and not out.exists()


def test_a_metric_given_as_a_file_path_is_imported_from_its_file(
    cwd: Path, tiny_onnx: Path, images: np.ndarray
) -> None:
    # "metrics/quality_e.py:agree" said "No module named 'quality_e.py'; 'quality_e' is not a package".
    (cwd / "metrics").mkdir()
    (cwd / "metrics" / "quality_e.py").write_text(
        "def agree(inputs, reference, outputs):\n"
        "    return float((reference[0].argmax(1) == outputs[0].argmax(1)).mean())\n"
    )
    np.savez(cwd / "eval.npz", image=images)
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--quantize", "int8-dynamic", "--eval",
                        cwd / "eval.npz", "--metric", "metrics/quality_e.py:agree", "--max-drop", "1.0", "-o",
                        cwd / "out", "--json")  # fmt: skip
    assert code == 0, text
    assert json.loads(text)["metrics"]["quality_metric_source"].startswith("quality_e.py sha256:")
    code, text = invoke(tiny_onnx, "--eval", cwd / "eval.npz", "--metric", "metrics/none_f.py:agree", "-o",
                        cwd / "out2")  # fmt: skip
    assert code == 2 and "cannot import it (ModuleNotFoundError: no file metrics/none_f.py)" in text, text


def test_a_forward_taking_star_args_uses_a_single_array_and_names_the_problem_otherwise() -> None:
    import torch

    from edgectl.compress.errors import BadInputError
    from edgectl.compress.passes.export import input_names

    class Star(torch.nn.Module):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return inputs[0]

    # No named parameter: no input at all, the call ran forward() with nothing, and the error read
    # "fails on the sample data ( per sample): IndexError".
    assert input_names(Star(), ["x"]) == ["x"]
    with pytest.raises(BadInputError, match=r"forward\(\) takes \*args, so its inputs have no names"):
        input_names(Star(), ["ids", "mask"])
