"""Artifact trust on the control plane: an untrusted signature is refused at upload, and again at
rollout Create when its key was rotated out after the upload. (The agent's own refusal is
tests/agent/test_agent_reconcile.py: "not a trusted key".)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from edgectl.artifact import Artifact, SigningKey, TrustStore
from edgectl.client import ControlPlaneClient, RemoteError, push_artifact
from edgectl.control_plane.server import ControlPlane
from edgectl.protos.v1 import common_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from tests.control_plane.sim_device import SimFleet, wait_for
from tests.control_plane.test_cp_api import state_of


def test_untrusted_signature_is_refused_at_upload(
    cp: ControlPlane, client: ControlPlaneClient, build: Callable[..., Artifact]
) -> None:
    before = state_of(cp)
    with pytest.raises(RemoteError) as info:
        push_artifact(client, build(version=1, signing_key=SigningKey.generate()).root)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "trusted" in str(info.value), str(info.value)
    assert state_of(cp) == before


def test_key_rotated_out_after_upload_refuses_the_rollout(
    cp_factory: Callable[..., ControlPlane], sim: SimFleet, build: Callable[..., Artifact],
    signing_key: SigningKey, tmp_path: Path,
) -> None:  # fmt: skip
    old_key = SigningKey.generate()
    state = f"sqlite:///{tmp_path}/rotate.db"
    first = cp_factory(state, TrustStore([signing_key.public_key, old_key.public_key]))
    with ControlPlaneClient(first.address, timeout=20) as client:
        old = push_artifact(client, build(version=1, signing_key=old_key).root).artifact.ref.digest
    first.stop(grace=0)
    rotated = cp_factory(state, TrustStore([signing_key.public_key]))  # the old key is no longer trusted
    assert rotated.election.leading.wait(10)
    sim.add("dev-1", {"site": "lab"})
    sim.connect()
    wait_for(lambda: len(rotated.fleet.list_devices()) == 1, 10, what="device registered")
    before = state_of(rotated)
    request = RP.CreateRolloutRequest(
        artifact=old, selector=common_pb2.Selector(match_labels={"site": "lab"})
    )
    with ControlPlaneClient(rotated.address, timeout=20) as client, pytest.raises(grpc.RpcError) as info:
        client.rollouts.Create(request)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no longer trusts" in (info.value.details() or "")
    assert state_of(rotated) == before
