"""What every command shares: the consoles, error lines, and the not-yet-built exit."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from rich.console import Console

from edgectl.errors import NotImplementedYet

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine output: one JSON document on stdout, nothing else."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def not_implemented(command: str, issue: str) -> NoReturn:
    """Fail loudly: a documented command whose implementation has not landed yet."""
    raise NotImplementedYet(
        f"`edgectl {command}` is not implemented yet", hint=f"tracked in the {issue} issue"
    )
