"""Structured pruning really removes channels, keeps residual/depthwise graphs valid; unstructured refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgectl.compress.channel_groups import channel_groups
from edgectl.compress.data import SampleSet
from edgectl.compress.errors import PruneRefusedError
from edgectl.compress.evaluate import Evaluator
from edgectl.compress.graph import count_params, cpu_session, model_stats
from edgectl.compress.passes.cleanup import cleanup
from edgectl.compress.passes.prune import PruneConfig, prune_structured, prune_unstructured


def weights(path: Path) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def residual_clean(residual_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("res") / "clean.onnx"
    cleanup(residual_onnx, out)
    return out


@pytest.fixture(scope="module")
def residual_data() -> SampleSet:
    return SampleSet({"image": np.random.default_rng(2).random((16, 3, 16, 16), dtype=np.float32)}, None, "t")


def test_chain_pruning_shrinks_weights_and_keeps_output_shape(
    tiny_onnx: Path, tmp_path: Path, images: np.ndarray
) -> None:
    out = tmp_path / "p.onnx"
    report = prune_structured(
        tiny_onnx, out, PruneConfig(ratio=0.5, round_to=4), SampleSet({"image": images}, None, "t")
    )
    assert report.pruned_groups == 2 and report.channels_before == 48 and report.channels_after == 24
    before, after = weights(tiny_onnx), weights(out)
    convs = sorted(k for k, v in before.items() if len(v) == 4)
    assert [before[k][0] for k in convs] == [16, 32] and [after[k][0] for k in convs] == [8, 16]
    assert after[convs[1]][1] == 8  # conv2 lost the input channels conv1 lost
    fc = next(k for k, v in before.items() if v == (10, 512))
    assert after[fc] == (10, 256)  # the Linear after Flatten lost 16 channels x 4x4 positions
    assert count_params(onnx.load(str(out))) < count_params(onnx.load(str(tiny_onnx))) * 0.5
    feed = {"image": images[:5]}
    assert cpu_session(out).run(None, feed)[0].shape == (5, 10)
    assert model_stats(out, feed).macs < model_stats(tiny_onnx, feed).macs * 0.4


def test_residual_and_depthwise_groups_are_pruned_together(
    residual_clean: Path, residual_data: SampleSet, tmp_path: Path
) -> None:
    groups = channel_groups(onnx.load(str(residual_clean)))
    tied = [g for g in groups if len(g.producers) == 2]  # stem and b feed the residual Add
    assert len(tied) == 1 and tied[0].problem is None
    assert any(g.depthwise for g in groups)  # `a` feeds the depthwise conv, which passes channels through
    out = tmp_path / "p.onnx"
    report = prune_structured(residual_clean, out, PruneConfig(ratio=0.5), residual_data)
    assert report.pruned_groups == 3 and not report.skipped
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    dw = next(
        n
        for n in model.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    )
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == 16 and weights(out)[dw.input[1]][0] == 16
    feed = {"image": residual_data.inputs["image"][:3]}
    assert cpu_session(out).run(None, feed)[0].shape == (3, 5)
    assert Evaluator(residual_clean, residual_data).quality(out).score > 0.5  # a valid, related model


def test_recalibration_recovers_output_fidelity(
    residual_clean: Path, residual_data: SampleSet, tmp_path: Path
) -> None:
    ev = Evaluator(residual_clean, residual_data)
    plain, fixed = tmp_path / "a.onnx", tmp_path / "b.onnx"
    prune_structured(residual_clean, plain, PruneConfig(ratio=0.5, recalibrate=False), residual_data)
    report = prune_structured(residual_clean, fixed, PruneConfig(ratio=0.5, recalibrate=True), residual_data)
    assert report.recalibrated_nodes > 0
    assert ev.quality(fixed).score > ev.quality(plain).score


def test_group_reaching_a_graph_output_is_left_alone(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 4, 4])],
        [w],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    report = prune_structured(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5))
    assert report.pruned_groups == 0 and "graph output" in report.skipped[0]
    assert weights(tmp_path / "p.onnx")["w"] == (8, 3, 1, 1)


def test_unstructured_pruning_refuses_dense_targets_and_does_2_4_where_supported(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    with pytest.raises(PruneRefusedError, match="dense"):
        prune_unstructured(tiny_onnx, tmp_path / "u.onnx", PruneConfig(kind="unstructured"),
                           profile_name="x86-cpu-vnni", sparse_2_4=False)  # fmt: skip
    n = prune_unstructured(tiny_onnx, tmp_path / "u.onnx", PruneConfig(kind="unstructured"),
                           profile_name="jetson-orin-nano", sparse_2_4=True)  # fmt: skip
    assert n >= 1
    conv2 = next(
        i for i in onnx.load(str(tmp_path / "u.onnx")).graph.initializer if list(i.dims) == [32, 16, 3, 3]
    )
    w = np.moveaxis(numpy_helper.to_array(conv2), 1, -1).reshape(-1, 4)
    assert ((w == 0).sum(axis=1) >= 2).all()  # two of every four input weights are zero


def test_finetune_hook_runs_on_the_pruned_model_and_its_result_ships(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    from edgectl.compress.pipeline import CompressRequest, run
    from edgectl.compress.recipe import Recipe

    seen: list[tuple[int, int]] = []

    def refit_head(src: Path, dst: Path, calib: SampleSet) -> None:
        """Least-squares refit of the last Gemm so the pruned model's logits match the float ones."""
        model = onnx.load(str(src))
        head = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(head.input[0])])
        x = cpu_session(probe.SerializeToString(), threads=0).run([head.input[0]], dict(calib.inputs))[0]
        y = cpu_session(tiny_onnx, threads=0).run(None, dict(calib.inputs))[0]
        seen.append((x.shape[0], x.shape[1]))
        sol = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1), np.float32)]), y, rcond=None)[0]
        inits = {i.name: i for i in model.graph.initializer}
        trans = next((a.i for a in head.attribute if a.name == "transB"), 0)
        w = sol[:-1].T if trans else sol[:-1]
        inits[head.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), head.input[1]))
        inits[head.input[2]].CopyFrom(numpy_helper.from_array(sol[-1].astype(np.float32), head.input[2]))
        onnx.save(model, str(dst))

    np.savez(tmp_path / "calib.npz", image=images)
    req = CompressRequest(
        model=str(tiny_onnx), out_dir=tmp_path / "out", profile="x86-cpu-vnni",
        recipe=Recipe.from_options(quantize="none", prune=0.5), calib=tmp_path / "calib.npz",
        max_drop=1.0, latency_rounds=2, finetune=refit_head,
    )  # fmt: skip
    result = run(req)
    assert seen and seen[0][0] == len(images) and seen[0][1] < 32 * 4 * 4  # pruned features, calib samples
    pruned, tuned = (t for t in result.trials if t.stage == "prune")
    assert tuned.name.endswith("fine-tuned") and result.chosen is tuned
    assert tuned.quality and pruned.quality and tuned.quality.score > pruned.quality.score
    assert "refit_head" in json_manifest(result.out_dir)["recipe"]["finetune"]["hook"]


def json_manifest(folder: Path) -> dict[str, object]:
    import json

    return json.loads((folder / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_torch_pruning_that_removes_nothing_is_refused_not_reported_as_done() -> None:
    """A torch.export program's module hides its layers from Torch-Pruning: it used to 'prune 50%'
    nothing, and the table and manifest said pruned 50% with the same parameter count."""
    import torch

    from edgectl.compress.recover import prune_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 4),
    )
    x = torch.randn(2, 16)
    pruned = prune_torch(net, 0.5, [x])  # the nn.Module itself: its hidden layers shrink
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    program = torch.export.export(net.eval(), (x,)).module()
    with pytest.raises(PruneRefusedError, match="found no channel it could remove"):
        prune_torch(program, 0.5, [x])


def test_graph_pruning_that_removes_nothing_is_refused_and_auto_prunes_nothing(tmp_path: Path) -> None:
    from tests.compress.test_compress_cli import invoke
    from tests.compress.test_compress_shapes import _mlp

    # An MLP has no Conv channel group: the table said "pruned 30%" for the model as it was.
    model = _mlp(tmp_path / "mlp.onnx", "n")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32))
    args = [model, "--profile", "x86-cpu-vnni", "--quantize", "none", "--eval", data]
    code, text = invoke(*args, "--prune", "0.3", "-o", tmp_path / "a")
    assert code != 0 and "structured pruning at 30% removes no channel from this model" in text, text
    assert not (tmp_path / "a").exists()
    code, text = invoke(*args, "--prune", "auto", "-o", tmp_path / "b", "--json")
    assert code == 0, text
    assert not [t for t in json.loads(text)["metrics"]["trials"] if t["stage"] == "prune"]
    record = json_manifest(tmp_path / "b")["recipe"]["prune"]  # type: ignore[index]
    assert record["auto"]["kept"] is None and "removes no channel" in record["auto"]["reason"]


def test_prune_auto_with_no_ratio_inside_the_budget_ships_the_model_unpruned(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    from tests.compress.test_compress_cli import invoke

    data = tmp_path / "d.npz"
    np.savez(data, image=images)
    out = tmp_path / "out"
    # The smallest ratio tried (25%) missed the budget too, yet it was kept and the run failed.
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--prune", "auto", "--quantize", "none",
                        "--eval", data, "--max-drop", "0.000001", "-o", out, "--json")  # fmt: skip
    assert code == 0, text
    pruned = [t for t in json.loads(text)["metrics"]["trials"] if t["stage"] == "prune"]
    assert pruned and not any(t["passed"] for t in pruned)
    manifest = json_manifest(out)
    assert manifest["recipe"]["prune"]["auto"]["kept"] is None  # type: ignore[index]
    assert manifest["metrics"]["params"] == manifest["metrics"]["baseline_params"]  # type: ignore[index]


def test_torch_pruning_that_cannot_follow_an_einsum_does_not_ask_for_a_factory() -> None:
    """A factory's conv that feeds an einsum with a raw Parameter stays whole; the refusal told the
    user to pass the model as a factory, which they had."""
    import torch

    from edgectl.compress.recover import prune_torch

    class Mix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.mix = torch.nn.Parameter(torch.randn(24, 16))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bchw,oc->bo", torch.relu(self.conv(image)), self.mix)

    with pytest.raises(PruneRefusedError) as refused:
        prune_torch(Mix().eval(), 0.5, [torch.randn(2, 1, 8, 8)])
    assert "feed ops it cannot trace" in str(refused.value) and "factory" not in refused.value.hint


def test_a_row_says_how_many_channels_went_when_groups_stay_whole(tmp_path: Path) -> None:
    """A UNet's skip Concat keeps most groups whole: "pruned 50%" removed a quarter of the channels,
    and the table did not say so."""
    import torch

    from tests.compress.conftest import export_ts
    from tests.compress.test_compress_cli import invoke

    class Skip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)
            self.c, self.out = torch.nn.Conv2d(32, 16, 1), torch.nn.Conv2d(32, 3, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.a(image))
            return self.out(torch.cat([a, self.c(torch.relu(self.b(a)))], 1))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    model = export_ts(Skip(), x[:2], tmp_path / "skip.onnx")
    np.savez(tmp_path / "x.npz", image=x)
    code, text = invoke(model, "--profile", "x86-cpu-vnni", "--prune", "0.5", "-q", "none", "--calib",
                        tmp_path / "x.npz", "--eval", tmp_path / "x.npz", "--max-drop", "1", "-o",
                        tmp_path / "out", "--json")  # fmt: skip
    assert code == 0, text
    row = next(t for t in json.loads(text)["metrics"]["trials"] if t["name"] == "pruned 50%")
    assert row["note"].startswith("removed 16 of 67 channels (24%); 3 of 4 channel groups kept whole"), row


def test_a_gate_map_broadcast_over_the_channels_keeps_its_group_whole(tmp_path: Path) -> None:
    """Spatial attention, ``x * sigmoid(conv(x))`` with a one-channel map: the gate conv's single
    filter was taken as one of x's 32 filters, and slicing it raised IndexError (a traceback)."""
    import torch

    from tests.compress.conftest import export_ts

    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.gate = torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.Conv2d(32, 1, 1)
            self.b, self.fc = torch.nn.Conv2d(32, 16, 3, padding=1), torch.nn.Linear(16, 4)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.a(image))
            x = x * torch.sigmoid(self.gate(x))
            return self.fc(torch.relu(self.b(x)).mean((2, 3)))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    model = export_ts(Gate(), x[:2], tmp_path / "gate.onnx")
    calib = SampleSet({"image": x}, None, "calib")
    report = prune_structured(model, tmp_path / "pruned.onnx", PruneConfig(ratio=0.5), calib)
    assert report.pruned_groups == 1 and any("broadcasts" in why for why in report.skipped), report
    out = cpu_session(tmp_path / "pruned.onnx", threads=1).run(None, {"image": x})[0]
    assert out.shape == (16, 4)


def test_conv1d_channels_prune_and_recalibrate(tmp_path: Path) -> None:
    """A Conv1d stack (N, C, L): recalibration summed kernel taps over axes (2, 3) and raised
    AxisError on the 3-D weights, and mean over L read as 'drops dims' (axes taken modulo 4)."""
    import torch

    from tests.compress.conftest import export_ts

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(4, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv1d(32, 32, 3, padding=1), torch.nn.ReLU())  # fmt: skip

    class Series(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.fc = net, torch.nn.Linear(32, 4)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.fc(self.net(image).mean(-1))  # type: ignore[no-any-return]

    x = np.random.default_rng(0).random((16, 4, 20), dtype=np.float32)
    model = export_ts(Series(), x[:2], tmp_path / "series.onnx")
    calib = SampleSet({"image": x}, None, "calib")
    report = prune_structured(model, tmp_path / "pruned.onnx", PruneConfig(ratio=0.5), calib)
    assert (report.pruned_groups, report.channels_after, report.recalibrated_nodes) == (2, 32, 2), report
    ref = cpu_session(model, threads=1).run(None, {"image": x})[0]
    out = cpu_session(tmp_path / "pruned.onnx", threads=1).run(None, {"image": x})[0]
    assert out.shape == ref.shape == (16, 4)


def test_a_pruned_model_that_misses_the_budget_is_refused_before_anything_is_quantized(
    tiny_onnx: Path, images: np.ndarray, tmp_path: Path
) -> None:
    """An explicit --prune whose float model already misses --max-drop: quantizing on top of it can
    only add error, so the run stops there and the refusal names the pruned model, not an int8 row."""
    from tests.compress.test_compress_cli import invoke

    data = tmp_path / "d.npz"
    np.savez(data, image=images)
    out = tmp_path / "out"
    code, text = invoke(tiny_onnx, "--profile", "x86-cpu-vnni", "--prune", "0.5", "--quantize", "int8-dynamic",
                        "--eval", data, "--max-drop", "0.000001", "-o", out, "--json")  # fmt: skip
    assert code == 4, text
    doc = json.loads(text)
    assert "the pruned float model already misses --max-drop" in doc["error"] and "pruned 50%" in doc["error"]
    stages = [t["stage"] for t in doc["trials"]]
    assert "prune" in stages and "quantize" not in stages, stages
    assert not out.exists()
