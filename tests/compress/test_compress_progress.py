"""What a run shows while it works: recovery's progress bar survives the log printer, one line a twentieth."""

from __future__ import annotations

import numpy as np
import pytest

from edgectl.cli.compress import _stage_printer
from edgectl.compress.data import SampleSet
from edgectl.compress.recover import recover

torch = pytest.importorskip("torch")


def test_recovery_progress_is_a_bar_of_twentieths_that_the_log_printer_prints_whole(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    student = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = np.random.default_rng(0).standard_normal((640, 8)).astype(np.float32)
    messages: list[str] = []
    # 8-sample batches: 80 steps an epoch, 160 in all. A log got one line per step.
    recover(student, teacher, SampleSet({"x": x}, None, "t"), ["x"], epochs=2, time_budget_s=60,
            progress=messages.append, batch=8)  # fmt: skip
    assert 20 <= len(messages) <= 22, messages
    assert messages[-1].startswith("recovering [" + "#" * 20 + "] epoch 2/2 loss ")
    show = _stage_printer()
    show(messages[-1])
    show("reading model[v2].onnx")
    err = capsys.readouterr().err
    # Rich read "[####...]" as a style tag and printed "recovering  epoch 2/2".
    assert "recovering [" + "#" * 20 + "] epoch 2/2" in err, err
    assert "model[v2].onnx" in err
