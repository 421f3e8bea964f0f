"""``endpoints.json``: where a local fleet (`edgectl up`) listens, read and written in one place.

`edgectl up` writes it into the local fleet's data dir (``$EDGECTL_DATA_DIR``, default
``~/.edgectl``); every client command reads it when no flag, env or config file names a server,
a CA or a token. The agent's own data dir is a different folder with its own variable.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgectl.durable import atomic_write
from edgectl.errors import EdgectlError

ENDPOINTS_FILE = "endpoints.json"
DATA_DIR_ENV = "EDGECTL_DATA_DIR"


class LocalFleetError(EdgectlError):
    """A part of the local fleet did not start or stop, or there is no local fleet to talk to."""


class EndpointsFileError(LocalFleetError):
    """``endpoints.json`` exists but cannot be read."""

    exit_code = 2


def default_data_dir() -> Path:
    """The local fleet's data dir: ``$EDGECTL_DATA_DIR`` or ``~/.edgectl``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".edgectl"


@dataclass
class AgentEndpoint:
    """One agent of the local fleet: its id, V2 address, labels and process id."""

    device_id: str
    v2: str
    labels: dict[str, str]
    pid: int = 0


@dataclass
class Endpoints:
    """Where a local fleet listens, and how to prove who you are to it; written to endpoints.json.

    ``control_plane`` is the people's listener. When the fleet is secured, ``ca`` is the fleet
    CA that every server certificate chains to and ``token_file`` a 0600 file with an admin
    token: edgectl's clients (``edgectl.client.resolve_credentials``) read both from here.
    """

    mqtt: str
    control_plane: str
    agents: list[AgentEndpoint] = field(default_factory=list)
    cloud: AgentEndpoint | None = None
    pids: dict[str, int] = field(default_factory=dict)
    device_grpc: str | None = None
    ca: str | None = None
    token_file: str | None = None
    console: str | None = None  # the web console's URL
    metrics: dict[str, str] = field(default_factory=dict)  # part name -> HOST:PORT of its /metrics

    @property
    def secure(self) -> bool:
        """True when the fleet runs with TLS and tokens (it has a CA)."""
        return self.ca is not None

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON form."""
        return {
            "mqtt": self.mqtt,
            "control_plane": {
                "grpc": self.control_plane,
                "device_grpc": self.device_grpc,
                "ca": self.ca,
                "token_file": self.token_file,
                "console": self.console,
            },
            "metrics": self.metrics,
            "agents": [asdict(a) for a in self.agents],
            "cloud": asdict(self.cloud) if self.cloud else None,
            "pids": self.pids,
        }

    def write(self, data_dir: Path) -> Path:
        """Write ``data_dir/endpoints.json`` atomically; returns its path."""
        path = data_dir / ENDPOINTS_FILE
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())
        return path

    @staticmethod
    def remove(data_dir: Path) -> None:
        """Delete ``data_dir/endpoints.json`` (the fleet has stopped); no error if it is gone."""
        (data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)

    @classmethod
    def find(cls, data_dir: Path | None = None) -> Endpoints | None:
        """The endpoints in ``data_dir`` (default: the local fleet's), or None when there is no file."""
        path = (data_dir or default_data_dir()) / ENDPOINTS_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise EndpointsFileError(
                f"cannot read {path}: {exc}", hint="restart `edgectl up`, or pass --server"
            ) from exc
        try:
            # Older files hold the control plane as a plain "HOST:PORT" or name it "address".
            cp = raw["control_plane"]
            cp = cp if isinstance(cp, dict) else {"grpc": cp}
            agents = [AgentEndpoint(**a) for a in raw.get("agents", [])]
            cloud = AgentEndpoint(**raw["cloud"]) if raw.get("cloud") else None
            return cls(
                str(raw.get("mqtt", "")),
                str(cp.get("grpc") or cp["address"]),
                agents,
                cloud,
                dict(raw.get("pids", {})),
                cp.get("device_grpc"),
                cp.get("ca"),
                cp.get("token_file"),
                cp.get("console"),
                {str(k): str(v) for k, v in raw.get("metrics", {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise EndpointsFileError(
                f"{path} is damaged: {exc!r}", hint="run `edgectl down` then `edgectl up`, or pass --server"
            ) from exc

    @classmethod
    def read(cls, data_dir: Path) -> Endpoints:
        """The endpoints in ``data_dir``; LocalFleetError when no local fleet runs from there."""
        found = cls.find(data_dir)
        if found is None:
            raise LocalFleetError(f"no local fleet at {data_dir}", hint="start one with `edgectl up`")
        return found
