"""Model factories as a user writes them, for ``edgectl compress tests.compress.model_factories:NAME``."""

from __future__ import annotations

from typing import Any


def needs_a_config() -> Any:
    """A factory with a bug (or one that wants arguments)."""
    raise RuntimeError("factory needs a config")


NOT_A_FACTORY = 3
