"""The CLI's config file (``config.toml``) and its named contexts, kubeconfig-style.

One file in edgectl's config directory. Top-level keys (``server``, ``ca``, ``token``,
``token_file``; or the same under ``[control_plane]``) are the defaults; each
``[contexts.NAME]`` table names another control plane, and ``current_context`` picks one.
``EDGECTL_CONTEXT`` (or ``edgectl --context NAME``) picks one for a single command. Flags and
``EDGECTL_*`` variables still win over whatever the file says.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgectl.artifact.keystore import config_dir
from edgectl.durable import atomic_write
from edgectl.errors import UsageError

try:
    import tomllib
except ImportError:  # Python 3.10: no config file support, the other sources still work
    tomllib = None  # type: ignore[assignment]

CONTEXT_ENV = "EDGECTL_CONTEXT"
CONFIG_FILE = "config.toml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_override: list[str] = []  # `edgectl --context NAME`: this command only


def use_for_this_command(name: str | None) -> None:
    """Make ``name`` the context in force for the running command (None: back to env and file)."""
    _override[:] = [check_context_name(name)] if name else []


def selected_context_name(current: str) -> str:
    """The context asked for: ``--context``, else ``EDGECTL_CONTEXT``, else ``current`` (the file's)."""
    return (_override[0] if _override else "") or os.environ.get(CONTEXT_ENV, "") or current


@dataclass(frozen=True)
class Context:
    """Where one control plane is and how to prove who you are to it."""

    server: str = ""
    ca: str = ""
    token_file: str = ""
    token: str = field(default="", repr=False)

    def get(self, key: str) -> str | None:
        """The value of ``key`` (server, ca, token_file, token), or None when unset."""
        value = getattr(self, key, "")
        return str(value) if value else None

    def to_dict(self) -> dict[str, str]:
        """The set keys; a literal token is shown only as whether it is set."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}
        if "token" in out:
            out["token"] = "(set)"
        return out


@dataclass(frozen=True)
class CliConfig:
    """The parsed config.toml: defaults, named contexts and the current one."""

    defaults: Context = field(default_factory=Context)
    contexts: dict[str, Context] = field(default_factory=dict)
    current_context: str = ""

    @staticmethod
    def path() -> Path:
        """Where the file lives: ``$EDGECTL_CONFIG_DIR/config.toml`` or the XDG config dir."""
        return config_dir() / CONFIG_FILE

    @classmethod
    def load(cls) -> CliConfig:
        """The file's contents (empty when there is none); UsageError naming the file if unreadable."""
        path = cls.path()
        if tomllib is None or not path.is_file():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}", hint="fix the file, or pass --server") from exc
        flat = {**data.get("control_plane", {}), **{k: v for k, v in data.items() if isinstance(v, str)}}
        contexts = {
            str(name): _context(table, f"{path} [contexts.{name}]")
            for name, table in (data.get("contexts") or {}).items()
        }
        return cls(_context(flat, str(path)), contexts, str(data.get("current_context", "")))

    def active(self) -> tuple[str, Context]:
        """(name, context) in force: ``--context``, ``EDGECTL_CONTEXT``, ``current_context``, else the defaults."""
        name = selected_context_name(self.current_context)
        if not name:
            return "", self.defaults
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none yet"
            raise UsageError(
                f"no context {name!r} in {self.path()} (known: {known})",
                hint="edgectl config set-context NAME --server HOST:PORT, or edgectl config get-contexts",
            )
        return name, self.contexts[name]

    def value(self, key: str) -> str | None:
        """``key`` from the context in force, falling back to the file's defaults."""
        _, ctx = self.active()
        return ctx.get(key) or self.defaults.get(key)

    def with_context(self, name: str, context: Context) -> CliConfig:
        """A copy with context ``name`` set to ``context``."""
        check_context_name(name)
        return replace(self, contexts={**self.contexts, name: context})

    def save(self) -> None:
        """Write the file whole (0600: it may hold a token)."""
        lines = [f"{k} = {_quote(v)}" for k, v in _set(self.defaults).items()]
        if self.current_context:
            lines.append(f"current_context = {_quote(self.current_context)}")
        for name in sorted(self.contexts):
            lines += ["", f"[contexts.{_quote(name)}]"]
            lines += [f"{k} = {_quote(v)}" for k, v in _set(self.contexts[name]).items()]
        atomic_write(self.path(), ("\n".join(lines) + "\n").encode(), mode=0o600)


def check_context_name(name: str) -> str:
    """``name`` unchanged, or UsageError when it cannot be a context name."""
    if not _NAME.fullmatch(name):
        raise UsageError(f"invalid context name {name!r}", hint="use letters, digits, '.', '_' or '-'")
    return name


def _context(table: Any, where: str) -> Context:
    if not isinstance(table, dict):
        raise UsageError(f"{where} is not a table", hint='write [contexts.NAME] with server = "HOST:PORT"')
    known = {f.name for f in fields(Context)}
    return Context(**{k: str(v) for k, v in table.items() if k in known and v})


def _set(ctx: Context) -> dict[str, str]:
    return {f.name: getattr(ctx, f.name) for f in fields(ctx) if getattr(ctx, f.name)}


def _quote(value: str) -> str:
    """A TOML basic string: JSON's escaping of quotes, backslashes and control characters is TOML's."""
    return json.dumps(value)
