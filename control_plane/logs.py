"""The control plane's logging set-up: :mod:`edgectl.logs`, which the agent shares."""

from __future__ import annotations

from edgectl.logs import JsonFormatter, TextFormatter, configure

__all__ = ["JsonFormatter", "TextFormatter", "configure"]
