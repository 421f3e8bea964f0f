"""What an install promises: one import package, and an agent that never pulls in torch."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap


def _run(code: str) -> subprocess.CompletedProcess[str]:
    # From a neutral folder: the checkout itself must not be what makes an import work.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )


def test_agent_and_everything_it_imports_never_import_torch_or_compress() -> None:
    result = _run(
        """
        import importlib, pkgutil, sys
        import edgectl.agent as agent
        for mod in pkgutil.walk_packages(agent.__path__, "edgectl.agent."):
            importlib.import_module(mod.name)
        banned = sorted(m for m in sys.modules
                        if m.split(".")[0] == "torch"
                        or m.startswith(("edgectl.compress", "edgectl.control_plane")))
        print(",".join(banned))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the agent imported: {result.stdout.strip()}"


def test_generic_folder_names_are_not_installed_as_top_level_packages() -> None:
    result = _run(
        """
        import importlib.util
        print([n for n in ("agent", "artifact", "devices", "mqtt", "protos", "compress", "control_plane")
               if importlib.util.find_spec(n) is not None])
        """
    )
    assert result.stdout.strip() == "[]"


def test_every_brief_folder_imports_as_edgectl() -> None:
    result = _run(
        """
        import edgectl.agent, edgectl.artifact, edgectl.compress, edgectl.control_plane, edgectl.devices, edgectl.mqtt, edgectl.protos
        print("ok")
        """
    )
    assert result.stdout.strip() == "ok", result.stderr
