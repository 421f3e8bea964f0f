"""A replica reads its security dir from a Kubernetes Secret volume (root:fsGroup, mode 0440):
group read is accepted there, and only there; anything others can read is still refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgectl.control_plane.security import FleetSecurity
from edgectl.security.broker_files import write_broker_files
from edgectl.security.errors import SecurityError
from edgectl.security.tokens import TokenIssuer


def test_a_replica_loads_its_secrets_group_readable_as_a_secret_volume_mounts_them(tmp_path: Path) -> None:
    layout = write_broker_files(tmp_path / "sec", hostnames=["127.0.0.1"], host="127.0.0.1", port=8883,
                                plugin=Path("/dev/null"))  # fmt: skip
    TokenIssuer.load_or_create(layout.directory / "token.key")
    FleetSecurity(layout.directory, ["127.0.0.1"])  # makes the fleet key too
    secrets = [layout.directory / n for n in ("ca.key", "token.key", "control-plane-credentials.json")]
    for path in secrets:
        os.chmod(path, 0o440)
    security = FleetSecurity(layout.directory, ["127.0.0.1"])
    assert security.broker_credentials is not None and security.ca is not None
    # Outside the server (a workstation's own key), group read stays refused ...
    with pytest.raises(SecurityError, match="readable by other users"):
        TokenIssuer.load_or_create(layout.directory / "token.key")
    # ... and in the server, others' read is refused whatever the group may do.
    for path in secrets:
        os.chmod(path, 0o444)
        with pytest.raises(SecurityError, match="readable by other users"):
            FleetSecurity(layout.directory, ["127.0.0.1"])
        os.chmod(path, 0o440)
