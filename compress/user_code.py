"""The user's own Python named on the command line (``module:function``): a model factory, a metric.

Imported as ``python -m`` would find it: a module in the current directory is importable even
though the ``edgectl`` script's own folder, not the current one, heads ``sys.path``.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def import_user_module(name: str) -> ModuleType:
    """Import ``name``; a top-level module not found on ``sys.path`` is looked for in the current directory."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
    # The console script's sys.path lacks the current directory, which `python -m` and uvicorn add:
    # `edgectl compress mymodels:build` beside mymodels.py said "No module named 'mymodels'".
    sys.path.insert(0, here)
    return importlib.import_module(name)
