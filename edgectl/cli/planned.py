"""Commands of the documented tree whose implementation lands with later issues.

Each has its real options and help, and exits non-zero with "not implemented yet":
never a pretended success. Moving one out of here is how an issue lands its command.
"""

from __future__ import annotations

from edgectl.cli.output import not_implemented


def demo() -> None:
    """Train, compress, deploy in waves, infer, and roll back a bad version, all locally.

    Example: edgectl demo
    """
    not_implemented("demo", "end-to-end")
