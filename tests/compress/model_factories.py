"""Model factories as a user writes them, for ``edgectl compress tests.compress.model_factories:NAME``."""

from __future__ import annotations

from typing import Any


def needs_a_config() -> Any:
    """A factory with a bug (or one that wants arguments)."""
    raise RuntimeError("factory needs a config")


NOT_A_FACTORY = 3


def optional_inputs() -> Any:
    """A Hugging Face-style forward(): one input the data has, then optional ones and a flag."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 4)

        def forward(
            self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None, return_dict: bool = False
        ) -> torch.Tensor:
            out = self.fc(pixel_values)
            return out if mask is None else out * mask

    return Net().eval()


def linear_probe() -> Any:
    """One nn.Linear and nothing else: its only layer makes the output."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(20, 5)).eval()
