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
