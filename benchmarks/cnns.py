"""Three CNN shapes of our own for the int8 benchmark, none of them a textbook network.

A residual net with odd widths and a 5x5 stem followed by max pooling, a plain VGG-like stack with a
wide classifier, and a depthwise-separable MobileNet-like net with ReLU6. Random weights; BatchNorm
statistics are gathered from random images (train-mode passes), so activations keep a realistic
scale through the depth instead of vanishing into the classifier's bias.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.down(x))


class OddResNet(nn.Module):
    """Residual, widths 24/40/88/152 (not ResNet's), 5x5 stride-2 stem, max pool, 37 classes."""

    def __init__(self, widths: tuple[int, ...] = (24, 40, 88, 152), classes: int = 37) -> None:
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 5, 2, 2, bias=False), nn.BatchNorm2d(w0), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks: list[nn.Module] = []
        cin = w0
        for i, w in enumerate(widths):
            blocks += [_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(image)), 1)
        return self.fc(torch.flatten(x, 1))


class PlainVGG(nn.Module):
    """Conv-BN-ReLU pairs with max pooling (32/64/96/128), then a 2-layer classifier on 8x8 maps."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for width in (32, 64, 96, 128):
            for _ in range(2):
                layers += [nn.Conv2d(cin, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, classes)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class SeparableNet(nn.Module):
    """MobileNet-like: 3x3 stride-2 stem, depthwise-separable blocks with ReLU6, widths up to 200."""

    def __init__(self, classes: int = 100) -> None:
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
            )  # fmt: skip

        plan = [(16, 32, 1), (32, 48, 2), (48, 48, 1), (48, 80, 2), (80, 80, 1), (80, 136, 2), (136, 136, 1)]
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            *[separable(*p) for p in plan], separable(136, 200, 2),
        )  # fmt: skip
        self.fc = nn.Linear(200, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.net(image), 1), 1))


# name -> (class, input side in pixels)
CNNS: dict[str, tuple[type[nn.Module], int]] = {
    "residual (odd widths)": (OddResNet, 160),
    "plain VGG-like": (PlainVGG, 128),
    "depthwise-separable": (SeparableNet, 224),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The named CNN with random weights and BatchNorm statistics gathered on random images."""
    kind, side = CNNS[name]
    torch.manual_seed(seed)
    model = kind()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5, generator=gen)
            nn.init.uniform_(m.bias, -0.2, 0.2, generator=gen)
            m.momentum = None  # a plain average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, side, side, generator=gen))
    return model.eval()
