"""Graph pruning across the per-channel layers models add between convs: broadcast scales and shifts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgectl.compress.graph import cpu_session
from edgectl.compress.passes.prune import PruneConfig, prune_structured

torch = pytest.importorskip("torch")


class LayerScale(torch.nn.Module):
    """A per-channel scale (1, C, 1, 1) and shift (C, 1, 1) between two convs, as layer-scale models write."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.rand(1, 32, 1, 1))
        self.beta = torch.nn.Parameter(torch.rand(32, 1, 1))
        self.fc = torch.nn.Linear(32, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(image)) * self.gamma + self.beta
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))  # type: ignore[no-any-return]


def test_broadcast_per_channel_constants_are_sliced_on_their_channel_axis(tmp_path: Path) -> None:
    from tests.compress.conftest import export_ts

    torch.manual_seed(0)
    net = LayerScale()
    with torch.no_grad():  # channels 16..31 are the weakest and contribute nothing: pruning them is exact
        net.a.weight[16:] *= 1e-3
        net.gamma[:, 16:] = 0
        net.beta[16:] = 0
        net.b.weight[16:] *= 1e-3
        net.fc.weight[:, 16:] = 0
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    model = export_ts(net, x[:2], tmp_path / "scale.onnx")
    # The (1, 32, 1, 1) scale was sliced on axis 0: IndexError, a traceback instead of an artifact.
    report = prune_structured(model, tmp_path / "pruned.onnx", PruneConfig(ratio=0.5, recalibrate=False))
    assert report.pruned_groups == 2 and report.channels_after == 32, report
    shapes = [tuple(i.dims) for i in onnx.load(str(tmp_path / "pruned.onnx")).graph.initializer]
    assert (1, 16, 1, 1) in shapes and (16, 1, 1) in shapes, shapes
    ref = cpu_session(model, threads=1).run(None, {"image": x})[0]
    out = cpu_session(tmp_path / "pruned.onnx", threads=1).run(None, {"image": x})[0]
    # Each kept channel kept its own scale and shift.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_a_consumer_whose_weight_is_computed_keeps_the_group_whole(tmp_path: Path) -> None:
    """A conv reading a computed weight (weight norm, a dequantized weight) has no initializer to
    slice: it raised KeyError, a traceback instead of a pruning report."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 32, 3, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Identity", ["w2"], ["w2_computed"]),
         helper.make_node("Conv", ["r", "w2_computed"], ["y"], pads=[1, 1, 1, 1])],
        "computed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])], [w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = prune_structured(tmp_path / "m.onnx", tmp_path / "p.onnx", PruneConfig(ratio=0.5))
    assert report.pruned_groups == 0 and any("computed" in why for why in report.skipped), report
