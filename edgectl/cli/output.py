"""What every command shares: the consoles and machine output."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine output: one JSON document on stdout, nothing else."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str))
