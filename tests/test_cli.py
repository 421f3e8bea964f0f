"""The command tree: real --help everywhere, and no pretended success for what is not built."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

COMMANDS = ["compress", "artifact", "deploy", "rollout", "devices", "agent", "control-plane", "up", "demo",
            "infer", "doctor", "keys", "audit", "broker", "down", "sim", "config", "burst"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def edgectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgectl", *args], capture_output=True, text=True, timeout=60
    )


def listed_commands(help_text: str) -> set[str]:
    """The names in the Commands panel of --help: the first word of each entry, whole words only."""
    names: set[str] = set()
    in_panel = False
    for line in help_text.splitlines():
        if "Commands" in line:
            in_panel = True
        elif in_panel:
            # An entry starts right after the panel's border; a wrapped description starts with spaces.
            match = re.match(r"^[│|]? ([a-z][a-z0-9-]*)(?:\s|$)", line)
            if match:
                names.add(match.group(1))
    return names


def test_help_lists_every_command() -> None:
    result = edgectl("--help")
    assert result.returncode == 0
    assert listed_commands(result.stdout) == set(COMMANDS)


def test_listed_commands_reads_whole_names_only() -> None:
    # `up` and `infer` hide inside other words ("update", "inference"); only a panel entry counts.
    text = "│ Commands │\n│ deploy   Roll out an update.  │\n│          inference and backup │\n"
    assert listed_commands(text) == {"deploy"}


@pytest.mark.parametrize("command", [["deploy"], ["rollout", "status"], ["devices", "enroll"], ["agent", "run"],
                                     ["control-plane", "serve"], ["up"], ["infer"], ["broker", "config"], ["sim", "run"]])  # fmt: skip
def test_each_command_has_help_with_an_example(command: list[str]) -> None:
    result = edgectl(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


def test_version() -> None:
    result = edgectl("--version")
    assert result.returncode == 0 and result.stdout.startswith("edgectl ")


def _leaf_commands() -> list[tuple[tuple[str, ...], Callable[..., Any]]]:
    from typer.main import get_command

    from edgectl.cli import app

    def walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Callable[..., Any]]]:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd.callback

    return list(walk(get_command(app), ()))


def is_stub(fn: Callable[..., Any]) -> bool:
    """A command that does no work: only prints, raises or passes, or says it is not implemented."""
    source = textwrap.dedent(inspect.getsource(fn))
    if re.search(r"not (yet )?implemented|NotImplementedError", source, re.IGNORECASE):
        return True
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return all(isinstance(stmt, ast.Expr | ast.Raise | ast.Pass) for stmt in body)


# Commands that live beside a sibling rather than in a module of their own name.
HOME = {"deploy": "rollout", "down": "up"}


def test_every_command_of_the_tree_is_built() -> None:
    """Every command of the real tree does work, in the module named after it (one per command)."""
    leaves = _leaf_commands()
    assert {path[0] for path, _ in leaves} == set(COMMANDS)
    for path, fn in leaves:
        home = HOME.get(path[0], path[0].replace("-", "_"))
        assert fn.__module__ == f"edgectl.cli.{home}", (path, fn.__module__)
        assert not is_stub(fn), f"`edgectl {' '.join(path)}` is a stub"


def test_a_stub_is_recognised() -> None:
    # Positive control for is_stub: the shapes a placeholder command takes.
    def planned() -> None:
        """Not there yet."""
        print("coming soon")
        raise SystemExit(2)

    def not_yet() -> None:
        x = 1
        raise NotImplementedError(x)

    assert is_stub(planned) and is_stub(not_yet)


def test_every_control_plane_serve_flag_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer.main

    from edgectl.cli import app

    root: Any = typer.main.get_command(app)
    serve = root.commands["control-plane"].commands["serve"]
    options = [p for p in serve.params if p.param_type_name == "option" and p.name != "help"]
    missing = [p.name for p in options if not p.envvar]
    assert options and missing == [], f"control-plane serve flags without an EDGECTL_* variable: {missing}"
    assert all(str(p.envvar).startswith("EDGECTL_") for p in options)
    # The variable really sets the value, as a container's env would.
    monkeypatch.setenv("EDGECTL_CP_LISTEN", "0.0.0.0:17443")
    monkeypatch.setenv("EDGECTL_CP_DB_POOL_SIZE", "4")
    ctx = serve.make_context("serve", [])
    assert ctx.params["listen"] == "0.0.0.0:17443" and ctx.params["db_pool_size"] == 4
    # docs/cli.md lists them for whoever writes the container's environment: every one, by its name.
    listed = set(re.findall(r"`(EDGECTL_[A-Z_]+)`", (ROOT / "docs" / "cli.md").read_text()))
    unlisted = sorted({str(p.envvar) for p in options} - listed)
    assert unlisted == [], f"docs/cli.md does not list {unlisted}"
