"""The state store and the domain objects over it, against SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgectl.artifact import Artifact, LocalBlobStore, TrustStore
from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.controller import RolloutController
from edgectl.control_plane.desired import Publication
from edgectl.control_plane.device_state import Reported, Status
from edgectl.control_plane.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.identity import IssuedCertificate, verify_secret
from edgectl.control_plane.migrations import MIGRATIONS, migrate
from edgectl.control_plane.revocations import Revocation, TokenRevocations
from edgectl.control_plane.rollouts import Rollouts
from edgectl.control_plane.store import StateStore
from edgectl.control_plane.strategy import StrategySpec
from edgectl.labels import Selector
from edgectl.mqtt.wire import decode
from edgectl.protos.v1 import mqtt_pb2
from edgectl.security.tokens import CLOCK_SKEW_S, Role, TokenIssuer


class Recorder:
    """Collects what the controller would publish, and plays the devices' answers back."""

    def __init__(self) -> None:
        self.sent: list[Publication] = []

    def publish_desired(self, publications: list[Publication]) -> None:
        self.sent.extend(publications)


@pytest.fixture
def store(state_url: str) -> StateStore:
    s = StateStore(state_url)
    yield s
    s.close()


def upload(artifacts: ArtifactStore, art: Artifact) -> str:
    sig = (art.root / "manifest.sig.json").read_bytes()
    plan = artifacts.plan_upload(art.manifest_bytes, sig)
    wanted = {c.digest for f in art.manifest.files for c in f.chunks}
    for f in art.manifest.files:
        data = (art.root / f.path).read_bytes()
        for c in f.chunks:
            if c.digest in plan.missing_chunks:
                artifacts.receive_chunk(art.manifest, c.digest, data[c.offset : c.offset + c.size], wanted)
    return artifacts.commit_upload(plan.digest, "test").digest


def report(fleet: Fleet, device_id: str, models: dict[str, tuple[str, int]], generation: int = 0,
           failed: str = "", labels: dict[str, str] | None = None) -> None:  # fmt: skip
    state = mqtt_pb2.ReportedState(device_id=device_id, observed_generation=generation, labels=labels or {})
    for name, (digest, version) in models.items():
        state.models.add(
            name=name, digest=digest, version=version, smoke_test_passed=True, failed_digest=failed
        )
    fleet.apply([Reported(device_id, state, time.time()), Status(device_id, True, time.time())])


def test_migrations_run_once_and_are_idempotent(store: StateStore) -> None:
    assert store.schema_version() == MIGRATIONS[-1][0]
    assert migrate(store.db) == []
    assert store.schema_version() == MIGRATIONS[-1][0]


def test_enrollment_is_one_time_and_stores_only_a_hash(store: StateStore) -> None:
    fleet = Fleet(store, [b"PEM"], "mqtt://broker:1883")
    token = fleet.create_token("cam-1", {"site": "lab"})
    creds = fleet.enroll("cam-1", token.token, agent_version="1.0")
    assert creds.mqtt_username == "cam-1" and len(creds.mqtt_password) >= 32
    assert creds.trusted_keys == [b"PEM"] and creds.mqtt_url == "mqtt://broker:1883"
    with store.tx() as tx:
        stored = tx.scalar("SELECT password_hash FROM devices WHERE id = ?", ("cam-1",))
    assert creds.mqtt_password not in stored and verify_secret(creds.mqtt_password, stored)
    assert fleet.check_password("cam-1", creds.mqtt_password) and not fleet.check_password("cam-1", "guess")
    with pytest.raises(PermissionDenied, match="already used"):
        fleet.enroll("cam-1", token.token)
    other = fleet.create_token("cam-2", {})
    with pytest.raises(PermissionDenied):
        fleet.enroll("cam-1", other.token)
    assert fleet.get("cam-1").labels == {"site": "lab"}


def test_token_revocations_are_kept_until_the_token_expires(store: StateStore) -> None:
    issuer = TokenIssuer(Ed25519PrivateKey.generate())
    verifier = issuer.verifier()
    revocations = TokenRevocations(store)
    t0 = time.time()
    short = issuer.issue("temp", Role.VIEWER, ttl_s=60, now=t0)
    short_id = verifier.verify(short, now=t0).token_id
    done = revocations.revoke(verifier, token=short, by="root", now=t0)
    assert done == Revocation(short_id, "temp", True) and revocations.revoked(short_id)
    assert not revocations.revoke(verifier, token_id=short_id, by="root", now=t0).newly_revoked
    with pytest.raises(InvalidArgument, match="exactly one"):
        revocations.revoke(verifier, token=short, token_id=short_id, by="root")
    with pytest.raises(InvalidArgument, match="cannot revoke that token"):
        revocations.revoke(verifier, token=short + "x", by="root", now=t0)
    # Past its expiry (and the clock-skew allowance) the token is refused anyway: the next
    # revocation sweeps its row away.
    later = t0 + 60 + CLOCK_SKEW_S + 1
    long_lived = issuer.issue("ops", Role.ADMIN, now=later)
    revocations.revoke(verifier, token=long_lived, by="root", now=later)
    assert not revocations.revoked(short_id)
    assert revocations.revoked(verifier.verify(long_lived, now=later).token_id)


def test_labels_reports_and_decommission(store: StateStore) -> None:
    fleet = Fleet(store)
    report(fleet, "dev-1", {"digits": ("sha256:" + "1" * 64, 1)}, labels={"site": "lab", "ring": "a"})
    device = fleet.get("dev-1")
    assert device.online and device.models["digits"].version == 1
    fleet.label("dev-1", {"ring": "canary"}, [])
    assert fleet.get("dev-1").effective_labels == {"site": "lab", "ring": "canary"}
    assert [d.id for d in fleet.list_devices(Selector({"ring": "canary"}))] == ["dev-1"]
    assert fleet.list_devices(Selector({"ring": "a"})) == []
    fleet.decommission("dev-1")
    with pytest.raises(NotFound):
        fleet.get("dev-1")
    report(fleet, "dev-1", {})  # a stale retained report does not bring it back
    with pytest.raises(NotFound):
        fleet.get("dev-1")


def test_artifact_upload_dedup_and_delete(
    store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact]
) -> None:
    artifacts = ArtifactStore(store, LocalBlobStore(tmp_path / "blobs"), trust)
    v1, v2 = build(version=1), build(version=2)
    d1 = upload(artifacts, v1)
    assert artifacts.resolve("digits").digest == d1
    assert artifacts.plan_upload(
        v1.manifest_bytes, (v1.root / "manifest.sig.json").read_bytes()
    ).already_complete
    d2 = upload(artifacts, v2)
    assert artifacts.resolve("digits").digest == d2 and artifacts.resolve("digits:1").digest == d1
    assert artifacts.resolve(d1[:20]).digest == d1
    with pytest.raises(NotFound):
        artifacts.resolve("digits:7")
    model = (v2.root / "model.onnx").read_bytes()
    got = b"".join(p.data for p in artifacts.download_file(d2, "model.onnx", 1000))
    assert got == model[1000:]
    assert artifacts.delete(d1) > 0
    assert [a.digest for a in artifacts.list_artifacts()] == [d2]
    # golden.npz is shared by both versions: deleting v1 must keep the chunk v2 still needs.
    assert (
        b"".join(p.data for p in artifacts.download_file(d2, "golden.npz", 0))
        == (v2.root / "golden.npz").read_bytes()
    )


def _setup_rollout(store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact],
                   devices: int) -> tuple[Fleet, Rollouts, RolloutController, Recorder, str, str]:  # fmt: skip
    artifacts = ArtifactStore(store, LocalBlobStore(tmp_path / "blobs"), trust)
    fleet = Fleet(store)
    old, new = upload(artifacts, build(version=1)), upload(artifacts, build(version=2))
    for i in range(devices):
        report(fleet, f"dev-{i:02d}", {"digits": (old, 1)}, labels={"site": "lab"})
    recorder = Recorder()
    return fleet, Rollouts(store, artifacts, fleet), RolloutController(store, recorder), recorder, old, new


def _answer(fleet: Fleet, recorder: Recorder, bad: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Play the devices: each publication is applied (or refused, for devices in ``bad``)."""
    for pub in recorder.sent:
        state = decode(pub.payload, mqtt_pb2.DesiredState)
        model = state.models[0]
        if pub.device_id in bad and not model.rollback:
            current = fleet.get(pub.device_id).models["digits"]
            report(fleet, pub.device_id, {"digits": (current.digest, current.version)}, state.generation,
                   failed=model.digest)  # fmt: skip
        else:
            report(fleet, pub.device_id, {"digits": (model.digest, model.version)}, state.generation)
    recorder.sent.clear()


def test_rollout_moves_in_waves_and_logs_each_step_once(
    store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact]
) -> None:
    fleet, rollouts, controller, recorder, _old, new = _setup_rollout(store, tmp_path, trust, build, 10)
    view = rollouts.create("digits:2", Selector({"site": "lab"}), StrategySpec(("1", "50%", "100%")), "test")
    rid = view.rollout.id
    assert [w.size for w in view.waves] == [1, 4, 5]
    controller.step(rid)
    assert len(recorder.sent) == 1
    for _ in range(10):
        _answer(fleet, recorder)
        controller.step(rid)
    final = rollouts.get(rid)
    assert final.rollout.state == rs.SUCCEEDED
    assert all(fleet.get(f"dev-{i:02d}").models["digits"].digest == new for i in range(10))
    kinds = [e.kind for e in rollouts.events_after(rid, 0)]
    assert kinds.count("wave_started") == 3 and kinds.count("wave_succeeded") == 3
    assert kinds.count("device_healthy") == 10
    with store.tx() as tx:
        generations = {r[0]: r[1] for r in tx.all("SELECT id, generation FROM devices")}
    assert set(generations.values()) == {1}
    with pytest.raises(FailedPrecondition):
        rollouts.pause(rid)


def test_a_step_judges_who_reported_and_who_is_due_by_the_clock(
    store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact]
) -> None:
    fleet, rollouts, _, recorder, _old, _new = _setup_rollout(store, tmp_path, trust, build, 4)
    now = [1000.0]
    controller = RolloutController(store, recorder, clock=lambda: now[0])
    controller.full_judge_s = 3600.0  # no periodic look at every device until said
    spec = StrategySpec(("100%",), max_failures="100%", health_timeout_s=60)
    rid = rollouts.create("digits:2", Selector({"site": "lab"}), spec, "t").rollout.id

    def judged(kind: str) -> set[str]:
        return {e.device_id for e in rollouts.events_after(rid, 0) if e.kind == kind}

    controller.step_all()  # all four moved
    controller.step_all(set())  # those moved are judged once more: none has answered yet
    recorder.sent = [p for p in recorder.sent if p.device_id != "dev-03"]  # dev-03 never answers
    _answer(fleet, recorder)  # three serve the new version now...
    controller.step_all({"dev-01"})  # ...but only dev-01's report is said to have arrived
    assert judged("device_healthy") == {"dev-01"}
    controller.step_all(set())
    assert judged("device_healthy") == {"dev-01"}  # nothing reported: no step at all
    controller.step_all({"dev-99"})
    assert judged("device_healthy") == {"dev-01"}  # a device no rollout waits on: no step either
    now[0] += 61  # the health deadline passed: due by the clock, judged at the next full look
    controller.full_judge_s = 0.0
    controller.step_all(set())
    assert judged("device_healthy") == {"dev-00", "dev-01", "dev-02"}
    assert judged("device_failed") == {"dev-03"}
    assert rollouts.get(rid).rollout.state == rs.SUCCEEDED  # within the budget of 100 %


def test_the_clock_look_judges_devices_past_their_deadline_and_the_full_look_every_waiting_one(
    store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact]
) -> None:
    fleet, rollouts, _, recorder, _old, _new = _setup_rollout(store, tmp_path, trust, build, 3)
    now = [1000.0]
    controller = RolloutController(store, recorder, clock=lambda: now[0])
    spec = StrategySpec(("100%",), max_failures="100%", health_timeout_s=60)
    rid = rollouts.create("digits:2", Selector({"site": "lab"}), spec, "t").rollout.id

    def judged(kind: str) -> set[str]:
        return {e.device_id for e in rollouts.events_after(rid, 0) if e.kind == kind}

    controller.step_all()  # all three moved
    controller.full_judge_s, controller.clock_look_s = 3600.0, 0.0  # a look by the clock on every call
    controller.step_all(set())  # those moved are judged once more: none has answered yet
    recorder.sent = [p for p in recorder.sent if p.device_id != "dev-02"]  # dev-02 never answers
    _answer(fleet, recorder)  # dev-00 and dev-01 serve the new version, unannounced
    controller.step_all(set())
    assert judged("device_healthy") == set()  # nothing reported and no deadline passed: not judged
    controller.full_judge_s = 0.0
    controller.step_all(set())  # the full look judges every waiting device
    assert judged("device_healthy") == {"dev-00", "dev-01"} and judged("device_failed") == set()
    controller.full_judge_s = 3600.0
    now[0] += 61
    controller.step_all(set())  # dev-02's deadline passed: the clock look judges it
    assert judged("device_failed") == {"dev-02"}


def test_failed_wave_rolls_back_moved_devices(
    store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact]
) -> None:
    fleet, rollouts, controller, recorder, old, _new = _setup_rollout(store, tmp_path, trust, build, 6)
    rid = rollouts.create(
        "digits:2", Selector({"site": "lab"}), StrategySpec(("1", "50%", "100%")), "t"
    ).rollout.id
    bad = {f"dev-{i:02d}" for i in range(1, 6)}  # the canary passes, the second wave fails
    for _ in range(10):
        controller.step(rid)
        _answer(fleet, recorder, bad)
    view = rollouts.get(rid)
    assert view.rollout.state == rs.FAILED and "failure budget" in view.rollout.reason
    assert all(fleet.get(f"dev-{i:02d}").models["digits"].digest == old for i in range(6))
    moved = {p.device_id for p in view.devices if p.state == rs.D_ROLLED_BACK}
    assert moved == {f"dev-{i:02d}" for i in range(3)}
    assert {p.state for p in view.devices if p.device_id not in moved} == {rs.D_SKIPPED}


def test_bad_rollout_requests_change_nothing(
    store: StateStore, tmp_path: Path, trust: TrustStore, build: Callable[..., Artifact]
) -> None:
    _fleet, rollouts, _controller, _recorder, _old, _new = _setup_rollout(store, tmp_path, trust, build, 2)
    for args, error in [
        (("digits:2", Selector(), StrategySpec()), InvalidArgument),
        (("digits:9", Selector({"site": "lab"}), StrategySpec()), NotFound),
        (("digits:2", Selector({"site": "lab"}), StrategySpec(("50%", "10%"))), InvalidArgument),
        (("digits:2", Selector({"site": "lab"}), StrategySpec(("ten",))), InvalidArgument),
        (("digits:2", Selector({"site": "mars"}), StrategySpec()), FailedPrecondition),
    ]:
        with pytest.raises(error):
            rollouts.create(*args, "t")  # type: ignore[arg-type]
    assert rollouts.list_rollouts([]) == []


@pytest.mark.parametrize(
    ("gate", "stat", "value", "refusal"),
    [
        ({"max_error_rate": 0.05}, "error_rate", 0.2, "error rate 0.200 above 0.050 during soak"),
        ({"max_p99_ms": 50.0}, "p99_ms", 250.0, "p99 latency 250.0 ms above 50.0 ms during soak"),
        # Positive controls: the same report under the threshold, or over an ungated metric, soaks through.
        ({"max_error_rate": 0.05}, "error_rate", 0.04, None),
        ({"max_p99_ms": 50.0}, "p99_ms", 40.0, None),
        ({"max_p99_ms": 50.0}, "error_rate", 0.9, None),
    ],
    ids=["error-rate-over", "p99-over", "error-rate-under", "p99-under", "ungated-metric"],
)
def test_soak_window_gates_each_device_on_its_reported_stats(
    store: StateStore,
    tmp_path: Path,
    trust: TrustStore,
    build: Callable[..., Artifact],
    gate: dict[str, float],
    stat: str,
    value: float,
    refusal: str | None,
) -> None:
    fleet, rollouts, controller, recorder, old, new = _setup_rollout(store, tmp_path, trust, build, 2)
    clock = [1000.0]
    controller.clock = lambda: clock[0]
    spec = StrategySpec(("100%",), max_failures="0", soak_s=60, **gate)  # type: ignore[arg-type]
    rid = rollouts.create("digits:2", Selector({"site": "lab"}), spec, "t").rollout.id
    controller.step(rid)
    _answer(fleet, recorder)
    controller.step(rid)  # both run the new version: the soak starts, nobody is healthy yet
    assert {p.state for p in rollouts.get(rid).devices} == {rs.D_DESIRED}

    clock[0] += 30  # halfway through the soak, dev-01 reports its stats
    state = mqtt_pb2.ReportedState(device_id="dev-01", observed_generation=1)
    state.models.add(name="digits", digest=new, version=2, smoke_test_passed=True)
    setattr(state.stats, stat, value)
    fleet.apply([Reported("dev-01", state, time.time())])
    controller.step(rid)
    view = rollouts.get(rid)
    by_id = {p.device_id: p.state for p in view.devices}
    if refusal is not None:
        assert by_id["dev-01"] == rs.D_ROLLED_BACK
        assert view.rollout.state == rs.ROLLING_BACK and refusal in view.rollout.reason
        return
    assert by_id == {"dev-00": rs.D_DESIRED, "dev-01": rs.D_DESIRED}  # still soaking
    clock[0] += 31  # the soak window is over
    for _ in range(3):
        controller.step(rid)
    view = rollouts.get(rid)
    assert view.rollout.state == rs.SUCCEEDED, view.rollout.reason
    assert {p.state for p in view.devices} == {rs.D_HEALTHY}
    assert fleet.get("dev-01").models["digits"].digest == new != old


class SlowBroker:
    """Device identities whose broker takes a while to answer, to hold an enrollment open."""

    def __init__(self) -> None:
        self.provisioned: list[str] = []

    def issue_certificate(self, device_id: str, csr_pem: bytes) -> IssuedCertificate | None:
        return None

    def provision(self, device_id: str, password: str, site: str = "") -> None:
        time.sleep(0.5)
        self.provisioned.append(password)

    def revoke(self, device_id: str, site: str = "") -> None:
        pass

    def broker_url(self, site: str) -> str | None:
        return None


def test_a_token_is_spent_once_even_by_concurrent_enrollments(store: StateStore, state_url: str) -> None:
    broker = SlowBroker()
    replicas = [Fleet(store, identities=broker), Fleet(other := StateStore(state_url), identities=broker)]
    token = replicas[0].create_token("cam-1", {}).token
    outcomes: list[str] = []

    def attempt(fleet: Fleet) -> None:
        try:
            fleet.enroll("cam-1", token)
            outcomes.append("enrolled")
        except PermissionDenied:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(f,)) for f in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    other.close()
    assert sorted(outcomes) == ["enrolled", "refused"] and len(broker.provisioned) == 1


def test_a_broker_failure_gives_the_token_back(store: StateStore) -> None:
    class DownBroker(SlowBroker):
        def provision(self, device_id: str, password: str, site: str = "") -> None:
            raise Unavailable("cannot reach the broker's admin API")

    token = Fleet(store).create_token("cam-2", {"site": "lab"}).token
    with pytest.raises(Unavailable):
        Fleet(store, identities=DownBroker()).enroll("cam-2", token)
    with pytest.raises(NotFound):
        Fleet(store).get("cam-2")  # nothing stored
    assert Fleet(store).enroll("cam-2", token).mqtt_username == "cam-2"  # the token still works
