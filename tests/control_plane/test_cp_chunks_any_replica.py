"""MQTT chunk requests are answered by any live replica, leading or not, exactly once.

A device that fetches over MQTT while no replica leads (a failover in progress) used to have its
request dropped and wait out its idle timeout; every replica now shares one subscription, so the
broker hands each request to one of them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from edgectl.broker import MosquittoProcess
from edgectl.client import ClientCredentials, ControlPlaneClient, push_artifact
from edgectl.control_plane.device_state import Status
from edgectl.control_plane.leader import FileLeaderLock
from edgectl.control_plane.server import ControlPlane
from edgectl.mqtt.wire import SHARED_CHUNK_REQUESTS, DeviceTopics, agent_client_id, decode, encode
from edgectl.protos.v1 import common_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.bridge import central_admin
from edgectl.security.dynsec import CONTROL_PLANE_ROLE
from edgectl.security.errors import BrokerAdminError
from edgectl.security.tokens import Role, TokenIssuer
from tests.conftest import start_secured_broker
from tests.control_plane.conftest import BuildFn
from tests.harness.mqtt import MqttTestClient


def _ask_manifest(broker: MosquittoProcess, digest: str, device: str = "dev-chunks") -> MqttTestClient:
    topics = DeviceTopics(device)
    asker = MqttTestClient(broker.host, broker.port)
    assert not asker.connect().is_failure
    asker.subscribe(topics.chunk_data)
    request = mqtt_pb2.ChunkRequest(request_id=uuid.uuid4().hex, artifact_digest=digest, manifest=True)
    asker.publish(topics.chunk_requests, encode(request))
    return asker


def _answers(asker: MqttTestClient, within: float) -> list[mqtt_pb2.ChunkData]:
    got: list[mqtt_pb2.ChunkData] = []
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(decode(asker.expect(timeout=left).payload, mqtt_pb2.ChunkData))
        except Exception:
            break
    return got


def _followers(cp_factory: Callable[..., ControlPlane], state: str, n: int) -> list[ControlPlane]:
    """``n`` replicas on one SQLite state whose leader lock the test holds: none of them leads."""
    planes = [cp_factory(state_url=state) for _ in range(n)]
    for plane in planes:
        assert plane.bus.wait_connected(10)
    time.sleep(0.6)  # several election rounds (leader_interval 0.2 s)
    assert not any(p.leading for p in planes)
    return planes


def test_replicas_that_do_not_lead_answer_each_request_once(
    tmp_path: Path, mosquitto: MosquittoProcess, cp_factory: Callable[..., ControlPlane], build: BuildFn
) -> None:
    state = f"sqlite:///{tmp_path}/shared.db"
    held = FileLeaderLock(Path(f"{tmp_path}/shared.db.leader"))
    assert held.try_acquire()  # a leader that is gone but has not released the lock yet, as in failover
    try:
        first, _second = _followers(cp_factory, state, 2)
        with ControlPlaneClient(first.address, timeout=20) as client:
            digest = push_artifact(client, build().root).artifact.ref.digest
        for _ in range(4):  # each request is answered once, never by both replicas
            asker = _ask_manifest(mosquitto, digest)
            answers = _answers(asker, within=3.0)
            asker.close()
            assert len(answers) == 1, f"{len(answers)} answers to one request"
            assert answers[0].manifest and answers[0].last and not answers[0].error
    finally:
        held.release()


def test_without_the_shared_subscription_acl_the_leader_still_answers(
    tmp_path: Path, cp_factory: Callable[..., ControlPlane], build: BuildFn
) -> None:
    """A broker configured before shared subscriptions (its control-plane role lacks the ACL)
    refuses them: the control plane falls back to the leader answering, as it did, instead of
    nobody answering."""
    layout, broker = start_secured_broker(tmp_path / "fleet", tmp_path / "broker-data")
    try:
        # Make it an old broker's config. The plugin drops the role's clients on a change, this
        # admin session too, so no answer comes.
        with (
            central_admin(layout.credentials_file, timeout=3) as admin,
            contextlib.suppress(BrokerAdminError),
        ):
            admin.run("removeRoleACL", rolename=CONTROL_PLANE_ROLE, acltype="subscribePattern",
                          topic=SHARED_CHUNK_REQUESTS)  # fmt: skip
        plane = cp_factory(insecure=False, security_dir=layout.directory, mqtt_url="")
        assert plane.election.leading.wait(10) and plane.bus.wait_connected(10)
        token = TokenIssuer.load_or_create(layout.directory / "token.key").issue("tests", Role.ADMIN)
        creds = ClientCredentials(token=token, ca_pem=layout.ca_cert.read_bytes())
        with ControlPlaneClient(plane.address, timeout=20, credentials=creds) as client:
            digest = push_artifact(client, build().root).artifact.ref.digest
            # A secured fleet answers a device only for what is deployed to it: put it in a rollout.
            plane.fleet.apply([Status("dev-old", True, time.time())])
            plane.fleet.label("dev-old", {"fleet": "old"}, [])
            client.rollouts.Create(RP.CreateRolloutRequest(
                artifact=digest, selector=common_pb2.Selector(match_labels={"fleet": "old"}),
                strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=300)), timeout=10)  # fmt: skip
        deadline = time.monotonic() + 10
        while digest not in plane._deployed("dev-old") and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while not plane.bus._shared_refused and time.monotonic() < deadline:
            time.sleep(0.1)
        assert plane.bus._shared_refused, "the broker was expected to refuse the shared subscription"
        with central_admin(layout.credentials_file) as admin:
            device = admin.provision_device("dev-old")
        topics = DeviceTopics("dev-old")
        asker = MqttTestClient("127.0.0.1", layout.port, agent_client_id("dev-old"), username="dev-old",
                               password=device.password, tls_ca=str(layout.ca_cert))  # fmt: skip
        assert not asker.connect().is_failure
        asker.subscribe(topics.chunk_data)
        request = mqtt_pb2.ChunkRequest(request_id="r-old", artifact_digest=digest, manifest=True)
        asker.publish(topics.chunk_requests, encode(request))
        answers = _answers(asker, within=5.0)
        asker.close()
        assert len(answers) == 1 and answers[0].manifest, answers
    finally:
        broker.kill()
