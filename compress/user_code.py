"""The user's own Python named on the command line (``module:function``): a model factory, a metric.

Imported as ``python -m`` would find it: a module in the current directory is importable even
though the ``edgectl`` script's own folder, not the current one, heads ``sys.path``. The module may
also be given as a file (``metrics/quality.py:score``), which is imported as running it would see it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType


def import_user_module(name: str) -> ModuleType:
    """Import ``name``; a top-level module not found on ``sys.path`` is looked for in the current directory."""
    if name.endswith(".py"):
        # A file path where a module name goes: its folder is what `python file.py` puts on sys.path.
        path = Path(name).resolve()
        if not path.is_file():
            raise ModuleNotFoundError(f"no file {name}", name=name)
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        return importlib.import_module(path.stem)
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
