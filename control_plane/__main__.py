"""``python -m edgectl.control_plane serve ...``: the same command as ``edgectl control-plane serve``."""

from __future__ import annotations

import sys

from edgectl.cli.control_plane import app as control_plane_app
from edgectl.errors import EdgectlError


def main() -> None:
    """Run the control-plane command group; an EdgectlError is one line and its exit code."""
    try:
        control_plane_app(standalone_mode=True)
    except EdgectlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
