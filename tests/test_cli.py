"""The command tree: real --help everywhere, and no pretended success for what is not built."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["compress", "artifact", "deploy", "rollout", "devices", "agent", "control-plane", "up", "demo",
            "infer", "doctor", "keys", "audit", "broker", "down"]  # fmt: skip


def edgectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgectl", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_command() -> None:
    result = edgectl("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout, name


@pytest.mark.parametrize("command", [["deploy"], ["rollout", "status"], ["devices", "enroll"], ["agent", "run"],
                                     ["control-plane", "serve"], ["up"], ["infer"], ["broker", "config"]])  # fmt: skip
def test_each_command_has_help_with_an_example(command: list[str]) -> None:
    result = edgectl(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


def test_version() -> None:
    result = edgectl("--version")
    assert result.returncode == 0 and result.stdout.startswith("edgectl ")


def test_unbuilt_command_fails_loudly_without_a_traceback() -> None:
    result = edgectl("demo")
    if result.returncode != 3:
        pytest.skip("`edgectl demo` is built now: every command of the tree is real")
    assert result.returncode == 3
    assert "not implemented yet" in result.stderr
    assert "Traceback" not in result.stderr
