"""The agent's persisted state: what serves now, what served before, what was refused.

``state.json`` is the commit point of every swap. It is replaced atomically (temp file, fsync,
rename, fsync of the directory), so a kill -9 at any instant leaves either the old or the new
file, never a torn one, and the agent restarts serving exactly what the file names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgectl.agent.errors import AgentError
from edgectl.durable import atomic_write

STATE_FORMAT = "edgectl.agent-state/v1"


@dataclass(frozen=True)
class Installed:
    """One verified artifact on disk: its identity and its directory under ``artifacts/``."""

    digest: str
    version: int
    path: str


@dataclass
class ModelSlot:
    """One serving name: the active and previous artifacts, and the last refusal."""

    name: str
    active: Installed | None = None
    previous: Installed | None = None
    smoke_test_passed: bool = False
    provider: str = ""
    failed_digest: str = ""
    failure_reason: str = ""

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ModelSlot:
        def inst(v: Any) -> Installed | None:
            return Installed(str(v["digest"]), int(v["version"]), str(v["path"])) if v else None

        return cls(
            name=str(obj["name"]),
            active=inst(obj.get("active")),
            previous=inst(obj.get("previous")),
            smoke_test_passed=bool(obj.get("smoke_test_passed", False)),
            provider=str(obj.get("provider", "")),
            failed_digest=str(obj.get("failed_digest", "")),
            failure_reason=str(obj.get("failure_reason", "")),
        )


@dataclass
class AgentState:
    """Everything the agent must remember across restarts."""

    observed_generation: int = 0
    models: dict[str, ModelSlot] = field(default_factory=dict)
    order_epoch: int = 0  # the control-plane epoch of the last signed order (0: unsigned)

    def slot(self, name: str) -> ModelSlot:
        """The slot for ``name``, created empty on first use."""
        return self.models.setdefault(name, ModelSlot(name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "observed_generation": self.observed_generation,
            "order_epoch": self.order_epoch,
            "models": {name: asdict(slot) for name, slot in sorted(self.models.items())},
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> AgentState:
        if obj.get("format") != STATE_FORMAT:
            raise AgentError(f"state file has format {obj.get('format')!r}, expected {STATE_FORMAT}")
        return cls(
            observed_generation=int(obj.get("observed_generation", 0)),
            order_epoch=int(obj.get("order_epoch", 0)),
            models={n: ModelSlot.from_dict(s) for n, s in dict(obj.get("models", {})).items()},
        )


class StateStore:
    """Reads and atomically writes ``state.json`` in the data dir."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        """The saved state, or an empty one on first start. A damaged file is an error, not a reset."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        try:
            return AgentState.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(
                f"{self.path} is damaged: {exc}",
                hint="restore it from backup, or delete it to start over (the agent then re-fetches)",
            ) from exc

    def save(self, state: AgentState) -> None:
        atomic_write(self.path, json.dumps(state.to_dict(), indent=2, sort_keys=True).encode())
