"""``--prune`` with ``--train`` on torch models whose outputs are not one logits vector: a per-pixel
map, several heads in a dict. The pruned artifact must answer in the float model's shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgectl.compress.pipeline import compress_module
from edgectl.compress.recipe import Recipe

torch = pytest.importorskip("torch")
nn = torch.nn


class PixelClasses(nn.Module):
    """24 classes per pixel on 32x32 images: the output's width (32) is also the hidden convs' width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.out = nn.Conv2d(32, 24, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(image)))))  # type: ignore[no-any-return]


class Heads(nn.Module):
    """Class logits, a box map and an embedding, returned as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())  # fmt: skip
        self.cls = nn.Linear(32 * 4 * 4, 10)
        self.box = nn.Conv2d(32, 16, 1)
        self.emb = nn.Linear(32, 16)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.f(image)
        return {"logits": self.cls(torch.flatten(f, 1)), "box": self.box(f), "emb": self.emb(f.mean((2, 3)))}


def _shapes(model: Path, x: np.ndarray) -> list[tuple[int, ...]]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [tuple(o.shape) for o in session.run(None, {"image": x})]


def _compress(module: nn.Module, x: np.ndarray, tmp_path: Path, labels: np.ndarray | None) -> Path:
    train, out = tmp_path / "train.npz", tmp_path / "out"
    np.savez(train, image=x, **({} if labels is None else {"labels": labels}))  # type: ignore[arg-type]
    result = compress_module(
        module.eval(), out, profile="x86-cpu-vnni", example={"image": x[:16]}, train=train, max_drop=1.0,
        recipe=Recipe.from_options(quantize="none", prune="0.5", finetune_epochs=1), latency_rounds=1,
    )  # fmt: skip
    assert result.chosen is not None and result.chosen.stage == "prune", [t.name for t in result.trials]
    return out / "model.onnx"


def test_a_per_pixel_head_keeps_its_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((32, 1, 32, 32), dtype=np.float32)
    # The head's 24 classes were pruned to 8 (its width matched no output's last dim, 32), and
    # distillation failed on the shape mismatch with a traceback.
    assert _shapes(_compress(PixelClasses(), x, tmp_path, None), x[:4]) == [(4, 24, 32, 32)]


def test_dict_outputs_keep_every_head_and_train_with_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    # A dict of outputs raised AttributeError ('dict' object has no attribute 'ndim') in the label check.
    model = _compress(Heads(), x, tmp_path, np.arange(64) % 10)
    assert _shapes(model, x[:4]) == [(4, 10), (4, 16, 4, 4), (4, 16)]


class HardCodedHeads(nn.Module):
    """Self-attention that splits 4 heads of 16 by a width written into view(): what pruning breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(64, 3 * 64)
        self.out = nn.Linear(64, 64)
        self.cls = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 4, 16).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        return self.cls(self.out(attn.transpose(1, 2).reshape(n, t, 64)).mean(1))  # type: ignore[no-any-return]


def test_a_model_that_no_longer_runs_after_pruning_is_a_refusal_not_a_traceback() -> None:
    from edgectl.compress.errors import PruneRefusedError
    from edgectl.compress.recover import prune_torch

    torch.manual_seed(0)
    example = [torch.randn(2, 6, 64)]
    # Its forward() raised "shape '[2, 6, 3, 4, 16]' is invalid" out of the pipeline: exit 1, a traceback.
    with pytest.raises(
        PruneRefusedError, match=r"the model Torch-Pruning pruned no longer runs \(RuntimeError: shape"
    ):
        prune_torch(HardCodedHeads().eval(), 0.5, example)
