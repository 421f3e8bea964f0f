"""``lift.lift_layers`` on ``torch.export`` programs of models the digits CNN does not cover: what it lifts
computes the program's function exactly, and what it cannot lift it leaves as it was (never an error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest


def _lifted(model: Any, *example: Any) -> tuple[Any, Any]:
    import torch

    unlifted = torch.export.export(model.eval(), example).module()
    from edgectl.compress.lift import lift_layers

    return unlifted, lift_layers(unlifted)


def _kinds(module: Any) -> list[str]:
    import torch

    layers = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm)
    return sorted(type(m).__name__ for m in module.modules() if isinstance(m, layers))


def test_a_block_with_its_own_weight_and_a_child_layer_keeps_the_child() -> None:
    # The block's F.linear(x, self.weight) would have become an nn.Linear in the block's place,
    # dropping its child: lifting raised "Linear has no attribute `inner`".
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(16, 8))
            self.bias = torch.nn.Parameter(torch.randn(16))
            self.inner = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(F.linear(x, self.weight, self.bias))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = Block(), torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x))

    x = torch.randn(4, 8)
    unlifted, lifted = _lifted(Model(), x[:2])
    assert _kinds(lifted).count("Linear") == 2  # inner and head; the block's own weight stays a call
    with torch.no_grad():
        assert torch.equal(lifted(x[:2]), unlifted(x[:2]))


def test_a_fixed_filter_registered_as_a_buffer_is_not_made_a_layer() -> None:
    # A conv whose weight is a buffer (a fixed filter bank) could not become an nn.Conv1d's parameter:
    # lifting raised "cannot assign 'torch.FloatTensor' as parameter 'weight'".
    import torch
    import torch.nn.functional as F

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.filters = torch.nn.Module()
            self.filters.register_buffer("weight", torch.randn(4, 3, 5))
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.conv1d(x, self.filters.weight).mean(-1))

    x = torch.randn(2, 3, 20)
    unlifted, lifted = _lifted(Model(), x)
    assert _kinds(lifted) == ["Linear"]
    with torch.no_grad():
        assert torch.equal(lifted(x), unlifted(x))


@pytest.mark.parametrize("kind", ["conv1d-bn", "depthwise", "linear-bn1d", "tied"])
def test_lifted_user_layers_compute_the_programs_function_exactly(kind: str) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "conv1d-bn":
        model: nn.Module = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU())
        x, want = torch.randn(3, 3, 32), {"Conv1d": 1, "BatchNorm1d": 1}
    elif kind == "depthwise":
        model = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        )
        x, want = torch.randn(3, 8, 6, 6), {"Conv2d": 2, "BatchNorm2d": 1}
    elif kind == "linear-bn1d":
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        x, want = torch.randn(3, 6), {"Linear": 2, "BatchNorm1d": 1}
    else:  # one weight in two layers: neither may become a layer of its own
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
        model[2].weight = model[0].weight
        x, want = torch.randn(3, 8), {"Linear": 1}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    unlifted, lifted = _lifted(model, x)
    kinds = _kinds(lifted)
    assert {k: kinds.count(k) for k in want} == want
    with torch.no_grad():
        assert torch.equal(lifted(x), unlifted(x))
        assert torch.equal(lifted.eval()(x), model(x))


class _Flat:
    """A CNN whose forward flattens by ``x.view(x.size(0), -1)``: exported at batch 2 without dynamic
    shapes, torch.export bakes ``view(2, -1)`` into the program."""

    @staticmethod
    def build() -> Any:
        import torch
        import torch.nn.functional as F

        class Flat(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
                self.fc1, self.fc2 = torch.nn.Linear(16 * 8 * 8, 32), torch.nn.Linear(32, 4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = F.max_pool2d(F.relu(self.conv(x)), 2)
                return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))

        torch.manual_seed(0)
        return Flat().eval()


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_a_pt2_whose_code_is_bound_to_its_export_batch_is_refused_for_training(
    tmp_path: Path, dynamic_batch: bool
) -> None:
    # Without dynamic_shapes the lifted program ran view(2, -1) on recovery's batches of 64: a
    # traceback ("mat1 and mat2 shapes cannot be multiplied") where a reshape failed, and samples
    # mixed into each other where one did not. With a dynamic batch the same model trains.
    import torch

    from tests.compress.test_compress_cli import invoke

    model = _Flat.build()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(-1).numpy()
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    program = torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=shapes)
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    code, text = invoke(tmp_path / "m.pt2", "--prune", "0.5", "--quantize", "none", "--train", tmp_path / "d.npz",
                        "--finetune-epochs", "1", "--eval", tmp_path / "d.npz", "--max-drop", "1", "-o", tmp_path / "o")  # fmt: skip
    if dynamic_batch:
        assert code == 0, text
        return
    assert code == 2, text
    assert "exported at batch 2 without a dynamic batch" in text and "view(2, -1)" in text
    assert "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}" in text and "Traceback" not in text


@pytest.mark.parametrize("as_program", [False, True])
def test_a_model_whose_only_layer_is_its_head_is_told_to_drop_prune(tmp_path: Path, as_program: bool) -> None:
    # Nothing to prune once the head keeps its width: this said "use nn.Linear/nn.Conv modules for
    # those weights" (it is one) and exited 1 like a crash; it is bad input for --prune (exit 2).
    import torch

    from tests.compress.test_compress_cli import invoke

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 5)).eval()
    x = np.random.default_rng(0).standard_normal((64, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    if as_program:
        torch.export.save(torch.export.export(model, (torch.from_numpy(x[:2]),)), str(tmp_path / "m.pt2"))
        given: list[Any] = [tmp_path / "m.pt2"]
    else:
        torch.save(model.state_dict(), tmp_path / "sd.pt")
        given = ["tests.compress.model_factories:linear_probe", "--state-dict", tmp_path / "sd.pt"]
    code, text = invoke(*given, "--prune", "0.5", "--quantize", "none", "--train", tmp_path / "d.npz",
                        "--finetune-epochs", "1", "--eval", tmp_path / "d.npz", "-o", tmp_path / "o")  # fmt: skip
    assert code == 2, text
    assert "only nn.Linear/nn.Conv layer(s)" in text and "drop --prune" in text


def test_convs_with_same_padding_are_lifted_exactly_and_pruned() -> None:
    # padding="same" exports as the aten.convNd.padding overload, which stayed an aten call: its
    # channels were never pruned from a .pt2 although the factory's were.
    import torch
    from torch import nn

    from edgectl.compress.recover import prune_torch

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 16, 5, padding="same", dilation=2), nn.ReLU(), nn.Conv1d(16, 16, 3, padding="same"),
        nn.ReLU(), nn.Conv1d(16, 16, 3, padding="valid"), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(16, 4),
    )  # fmt: skip
    x = torch.randn(2, 3, 40)
    unlifted, lifted = _lifted(model, x)
    assert _kinds(lifted).count("Conv1d") == 3
    with torch.no_grad():
        assert torch.equal(lifted(x), unlifted(x)) and torch.equal(lifted(x), model(x))
    pruned = prune_torch(lifted, 0.5, [x])
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv1d)] == [8, 8, 8]


@pytest.mark.parametrize("batch", [2, 3])
def test_a_pinned_pt2_with_nothing_to_lift_says_it_has_no_layer(tmp_path: Path, batch: int) -> None:
    # One layer called twice: its weight is shared, nothing is lifted and the batch guard stays. The
    # batch check then blamed "code that depends on the batch" (the guard), and at batch 3 the
    # pruner's batch-2 example failed the guard.
    import torch

    from tests.compress.test_compress_cli import invoke

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    program = torch.export.export(Twice().eval(), (torch.from_numpy(x[:batch]),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "d.npz", x=x)
    code, text = invoke(tmp_path / "m.pt2", "--prune", "0.5", "--quantize", "none", "--train", tmp_path / "d.npz",
                        "--eval", tmp_path / "d.npz", "-o", tmp_path / "o")  # fmt: skip
    assert code == 2, text
    assert "it has no nn.Linear/nn.Conv layer to prune" in text and "depends on that batch" not in text


def test_a_decomposed_pt2_is_told_to_save_the_program_before_run_decompositions(tmp_path: Path) -> None:
    # run_decompositions() turns conv/linear into aten.convolution/aten.addmm, which lift does not
    # make layers again: the refusal blamed shared weights and asked for a factory only.
    import torch
    from torch import nn

    from tests.compress.test_compress_cli import invoke

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 4)).eval()
    x = np.random.default_rng(0).standard_normal((30, 3, 10)).astype(np.float32)
    program = torch.export.export(model, (torch.from_numpy(x[:2]),)).run_decompositions()
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "d.npz", x=x)
    code, text = invoke(tmp_path / "m.pt2", "--prune", "0.5", "--quantize", "none", "--train", tmp_path / "d.npz",
                        "--eval", tmp_path / "d.npz", "-o", tmp_path / "o")  # fmt: skip
    assert code == 2, text
    assert "saved after run_decompositions() (it calls aten.addmm, aten.convolution)" in text
    assert "before run_decompositions()" in text


def test_a_tied_weight_in_a_pt2_counts_once_in_the_recovery_report() -> None:
    # torch.export.load gives a tied weight as two Parameter objects on one storage: the report's
    # parameter count had it twice (4484 where the factory said 3460).
    import io

    import torch
    from torch import nn

    from edgectl.compress.data import SampleSet
    from edgectl.compress.recover import prune_and_recover

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )
    model[2].weight = model[0].weight
    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model.eval(), (torch.from_numpy(x[:2]),)), buffer)
    buffer.seek(0)
    program = torch.export.load(buffer).module()
    train = SampleSet({"x": x}, None, "train")
    reports = [
        prune_and_recover(m, 0.5, train, ["x"], epochs=1, time_budget_s=60, progress=lambda _: None)[2]
        for m in (model, program)
    ]
    assert reports[0].params_before == reports[1].params_before == 3460


def test_a_cumulative_batch_norm_keeps_averaging_once_lifted() -> None:
    # An eval export writes momentum=None as 0.0: lifted as 0.0, recovery would never update the stats.
    import torch
    from torch import nn

    from edgectl.compress.lift import lift_layers

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU()).eval()
    lifted = lift_layers(torch.export.export(net, (torch.randn(2, 1, 8, 8),)).module())
    norm = next(m for m in lifted.modules() if isinstance(m, nn.BatchNorm2d))
    assert norm.momentum is None
    before = norm.running_mean.clone()
    lifted.train()
    with torch.no_grad():
        lifted(torch.randn(16, 1, 8, 8) + 3.0)
    assert not torch.equal(norm.running_mean, before)
