"""Scheduled and continuous rollouts end to end: real gRPC, real mosquitto, simulated devices,
and an injected clock for the control plane (start times, maintenance windows, deadlines)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import grpc
import pytest

from edgectl.artifact import Artifact
from edgectl.client import ControlPlaneClient, push_artifact
from edgectl.control_plane import rollout_store as rs
from edgectl.control_plane.desired import current_models
from edgectl.control_plane.server import ControlPlane
from edgectl.protos.v1 import common_pb2, mqtt_pb2, rollouts_pb2
from tests.control_plane.conftest import BuildFn
from tests.control_plane.sim_device import SimFleet, wait_for
from tests.harness.clock import FakeClock

RP = rollouts_pb2
# A Tuesday, 12:00 in Berlin: outside a 01:00-04:00 window that next opens Wednesday 01:00.
TUESDAY_NOON = datetime(2026, 12, 1, 12, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
NEXT_OPEN = datetime(2026, 12, 2, 1, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()


def _plane(
    cp_factory: Callable[..., ControlPlane], clock: FakeClock | None = None, **kw: object
) -> ControlPlane:
    plane = cp_factory(clock=clock, **kw)
    assert plane.election.leading.wait(10) and plane.bus.wait_connected(10)
    return plane


def _devices(sim: SimFleet, ids: list[str], digest: str = "", bad: set[str] | None = None) -> None:
    for i in ids:
        device = sim.add(i, {"role": "cam"}, bad_digests=bad or set())
        if digest:
            device.active["digits"] = mqtt_pb2.ActiveModel(
                name="digits", digest=digest, version=1, smoke_test_passed=True
            )
    sim.connect(ids)


def _get(client: ControlPlaneClient, rollout_id: str) -> RP.Rollout:
    return client.rollouts.Get(RP.GetRolloutRequest(id=rollout_id), timeout=10)


def _reasons(client: ControlPlaneClient, rollout_id: str) -> dict[str, str]:
    return {d.device_id: d.reason for w in _get(client, rollout_id).waves for d in w.devices}


def _states(client: ControlPlaneClient, rollout_id: str) -> dict[str, int]:
    return {d.device_id: d.state for w in _get(client, rollout_id).waves for d in w.devices}


def _kinds(plane: ControlPlane, rollout_id: str) -> list[tuple[str, str]]:
    """(kind, device) of every event so far (Watch would block on a rollout that has not ended)."""
    return [(e.kind, e.device_id) for e in plane.rollouts.events_after(rollout_id, 0)]


def client_push(client: ControlPlaneClient, art: Artifact) -> str:
    return push_artifact(client, art.root).artifact.ref.digest


def test_start_at_waits_then_pause_after_wave_waits_for_resume(
    cp_factory: Callable[..., ControlPlane], sim: SimFleet, build: BuildFn
) -> None:
    clock = FakeClock(TUESDAY_NOON)
    plane = _plane(cp_factory, clock)
    with ControlPlaneClient(plane.address, timeout=20) as client:
        new = client_push(client, build(version=1))
        ids = [f"dev-{i}" for i in range(4)]
        _devices(sim, ids)
        wait_for(lambda: len(plane.fleet.list_devices()) == 4, 10, what="devices registered")
        start = RP.Strategy(waves=["1", "100%"], health_timeout_seconds=30, pause_after_waves=[1])
        start.start_at.FromSeconds(int(TUESDAY_NOON + 7200))
        request = RP.CreateRolloutRequest(
            artifact="digits", selector=common_pb2.Selector(match_labels={"role": "cam"}), strategy=start
        )
        rollout = client.rollouts.Create(request, timeout=10)
        assert rollout.strategy.start_at.seconds == int(TUESDAY_NOON + 7200)
        # an hour later by the control plane's clock: still waiting, nothing sent
        clock.advance(3600)
        plane.loop.wake()
        wait_for(lambda: plane.controller.clock() >= TUESDAY_NOON + 3600, 5, what="clock")
        threading.Event().wait(1.0)  # ten controller ticks
        assert _get(client, rollout.id).state == RP.ROLLOUT_STATE_PENDING
        assert sim.snapshot(lambda devs: sum(d.desired_received for d in devs.values())) == 0
        # pausing and resuming before its time does not start it early: it waits again, PENDING
        client.rollouts.Pause(RP.RolloutActionRequest(id=rollout.id), timeout=10)
        client.rollouts.Resume(RP.RolloutActionRequest(id=rollout.id), timeout=10)
        assert _get(client, rollout.id).state == RP.ROLLOUT_STATE_PENDING
        threading.Event().wait(0.5)
        assert _get(client, rollout.id).state == RP.ROLLOUT_STATE_PENDING
        assert sim.snapshot(lambda devs: sum(d.desired_received for d in devs.values())) == 0
        # the start time comes: wave 1 (one device) moves, then the rollout pauses for a person
        clock.advance(3601)
        wait_for(lambda: _get(client, rollout.id).state == RP.ROLLOUT_STATE_PAUSED, 15, what="paused")
        paused = _get(client, rollout.id)
        assert "rollout resume" in paused.reason and paused.current_wave == 1
        assert list(sim.digests("digits").values()).count(new) == 1
        threading.Event().wait(0.5)
        assert list(sim.digests("digits").values()).count(new) == 1, "the second wave waits for resume"
        client.rollouts.Resume(RP.RolloutActionRequest(id=rollout.id), timeout=10)
        wait_for(lambda: _get(client, rollout.id).state == RP.ROLLOUT_STATE_SUCCEEDED, 15, what="done")
        assert set(sim.digests("digits").values()) == {new}
        # a start time long past is a mistake, not "now"
        request.strategy.start_at.FromSeconds(int(clock() - 86400))
        with pytest.raises(grpc.RpcError) as err:
            client.rollouts.Create(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "past" in err.value.details()
        bad = RP.CreateRolloutRequest(
            artifact="digits", selector=common_pb2.Selector(match_labels={"role": "cam"}),
            strategy=RP.Strategy(waves=["100%"], window="Mon-Fri 01:00-04:00 Mars/Olympus"),
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            client.rollouts.Create(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Mars/Olympus" in err.value.details()


def test_window_rides_in_the_signed_order_and_moves_the_deadline(
    cp_factory: Callable[..., ControlPlane], sim: SimFleet, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window goes to devices with the model; the health clock starts when the window opens.
    A device that ignores the window (an agent older than the field) still converges."""
    clock = FakeClock(TUESDAY_NOON)
    plane = _plane(cp_factory, clock)
    with ControlPlaneClient(plane.address, timeout=20) as client:
        new = client_push(client, build(version=1))
        sim.add("old-agent", {"role": "cam"}).windows = False  # an agent that predates windows
        sim.connect(["old-agent"])
        sim.add("silent", {"role": "cam"}, delay=3600)  # accepts, never answers in time
        sim.add("new-agent", {"role": "cam"}).clock = clock  # honours the window, on the same clock
        sim.connect(["silent", "new-agent"])
        wait_for(lambda: len(plane.fleet.list_devices()) == 3, 10, what="devices registered")
        window = "Mon-Fri 01:00-04:00 Europe/Berlin"
        request = RP.CreateRolloutRequest(
            artifact="digits", selector=common_pb2.Selector(match_labels={"role": "cam"}),
            strategy=RP.Strategy(waves=["100%"], health_timeout_seconds=60, window=window, max_failures="2"),
        )  # fmt: skip
        rollout = client.rollouts.Create(request, timeout=10)
        wait_for(lambda: sim.digests("digits").get("old-agent") == new, 10, what="the old agent swapped")
        with plane.store.tx() as tx:
            _, models = current_models(tx, "silent")
            progress = {p.device_id: p for p in rs.devices(tx, rollout.id)}
        assert [(m.digest, m.window) for m in models] == [(new, window)]
        assert progress["silent"].deadline == NEXT_OPEN + 60
        wait_for(lambda: _states(client, rollout.id).get("old-agent") == RP.DEVICE_ROLLOUT_STATE_HEALTHY, 10,
                 what="the old agent judged healthy")  # fmt: skip
        # a device that honours the window stages, keeps its version, and the control plane says why
        wait_for(
            lambda: plane.fleet.get("new-agent").models["digits"].staged_digest == new, 10, what="staged"
        )
        assert sim.digests("digits")["new-agent"] == ""
        wait_for(lambda: "waiting for the window" in _reasons(client, rollout.id)["new-agent"], 10,
                 what="the wait shown")  # fmt: skip
        from tests.control_plane.test_cp_cli import run

        monkeypatch.setenv("EDGECTL_SERVER", plane.address)
        code, out = run("rollout", "status", rollout.id)  # the table says why, as the JSON does
        assert code == 0 and f"new-agent: staged, waiting for the window {window}" in " ".join(out.split())
        clock.advance(3600)  # past now + the timeout, still before the window: no verdict yet
        threading.Event().wait(1.0)
        assert _states(client, rollout.id)["silent"] == RP.DEVICE_ROLLOUT_STATE_DESIRED
        clock.advance(NEXT_OPEN + 61 - clock())
        wait_for(lambda: _states(client, rollout.id)["silent"] == RP.DEVICE_ROLLOUT_STATE_FAILED, 10,
                 what="the silent device failed once the window and its timeout passed")  # fmt: skip
        assert "health timeout" in _reasons(client, rollout.id)["silent"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_continuous_rollout_follows_late_devices_and_label_changes(
    backend: str, request: pytest.FixtureRequest, cp_factory: Callable[..., ControlPlane], sim: SimFleet,
    build: BuildFn,
) -> None:  # fmt: skip
    state_url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    plane = _plane(cp_factory, state_url=state_url)
    with ControlPlaneClient(plane.address, timeout=20) as client:
        old, new = client_push(client, build(version=1)), client_push(client, build(version=2))
        first = ["dev-a", "dev-b", "dev-c"]
        _devices(sim, first, old)
        wait_for(lambda: len(plane.fleet.list_devices()) == 3, 10, what="devices registered")
        for i in first:
            plane.fleet.label(i, {"site": "lab"}, [])
        request_ = RP.CreateRolloutRequest(
            artifact="digits:2", selector=common_pb2.Selector(match_labels={"site": "lab"}),
            strategy=RP.Strategy(waves=["1", "100%"], health_timeout_seconds=5, continuous=True),
        )  # fmt: skip
        rollout = client.rollouts.Create(request_, timeout=10)
        assert [len(w.devices) for w in rollout.waves] == [1, 2, 0], "initial waves, then the followers'"
        wait_for(lambda: _get(client, rollout.id).waves[2].state == RP.WAVE_STATE_IN_PROGRESS, 15,
                 what="the initial waves done, following")  # fmt: skip
        assert _get(client, rollout.id).state == RP.ROLLOUT_STATE_RUNNING
        assert {sim.digests("digits")[i] for i in first} == {new}

        # a device that shows up later, and one that is given the label later: both converge alone
        _devices(sim, ["late-1"], old)
        wait_for(lambda: len(plane.fleet.list_devices()) == 4, 10, what="late device registered")
        plane.fleet.label("late-1", {"site": "lab"}, [])
        _devices(sim, ["late-bad"], old, bad={new})
        wait_for(lambda: sim.digests("digits").get("late-1") == new, 15, what="the late device converged")
        plane.fleet.label("late-bad", {"site": "lab"}, [])
        wait_for(lambda: _states(client, rollout.id).get("late-bad") == RP.DEVICE_ROLLOUT_STATE_ROLLED_BACK,
                 15, what="the failing late joiner rolled back")  # fmt: skip
        with plane.store.tx() as tx:
            _, models = current_models(tx, "late-bad")
        assert [(m.digest, m.rollback) for m in models] == [(old, True)], "told to go back to what it ran"
        final = _get(client, rollout.id)
        assert final.state == RP.ROLLOUT_STATE_RUNNING and final.failures == 0
        assert _states(client, rollout.id)["late-1"] == RP.DEVICE_ROLLOUT_STATE_HEALTHY
        kinds = _kinds(plane, rollout.id)
        assert ("device_joined", "late-1") in kinds and ("device_failed", "late-bad") in kinds
        assert ("device_rolled_back", "late-bad") in kinds

        # three joiners at once (slow ones): moved one at a time, each judged before the next moves
        trio = ["late-x", "late-y", "late-z"]
        for i in trio:
            sim.add(i, {"role": "cam"}, delay=0.3)
        sim.connect(trio)
        wait_for(lambda: len(plane.fleet.list_devices()) == 8, 10, what="three more registered")
        for i in trio:
            plane.fleet.label(i, {"site": "lab"}, [])
        wait_for(
            lambda: all(sim.digests("digits").get(i) == new for i in trio), 20, what="the trio converged"
        )
        wait_for(lambda: all(_states(client, rollout.id).get(i) == RP.DEVICE_ROLLOUT_STATE_HEALTHY for i in trio),
                 10, what="the trio judged healthy")  # fmt: skip
        steps = [
            (k, d)
            for k, d in _kinds(plane, rollout.id)
            if d in trio and k in ("device_moving", "device_healthy")
        ]
        assert [k for k, _ in steps] == ["device_moving", "device_healthy"] * 3, steps
        assert all(steps[i][1] == steps[i + 1][1] for i in range(0, 6, 2)), (
            "each judged before the next moved"
        )

        # removing the label: the device goes back to what it ran before; a new label brings it back
        plane.fleet.label("dev-b", {}, ["site"])
        wait_for(lambda: sim.digests("digits")["dev-b"] == old, 15, what="dev-b back on the old version")
        assert "dev-b" not in _states(client, rollout.id)
        assert ("device_left", "dev-b") in _kinds(plane, rollout.id)
        plane.fleet.label("dev-b", {"site": "lab"}, [])
        wait_for(lambda: sim.digests("digits")["dev-b"] == new, 15, what="dev-b following again")

        # a new rollout to those devices is refused while the continuous one holds them, even to a
        # device it has not reached yet (labelled a moment ago); abort ends it
        with pytest.raises(grpc.RpcError) as err:
            client.rollouts.Create(request_, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and rollout.id in err.value.details()
        client.rollouts.Pause(RP.RolloutActionRequest(id=rollout.id), timeout=10)  # paused: no joins
        _devices(sim, ["not-yet"], old)
        wait_for(lambda: len(plane.fleet.list_devices()) == 9, 10, what="registered")
        plane.fleet.label("not-yet", {"site": "lab"}, [])
        threading.Event().wait(0.6)
        assert "not-yet" not in _states(client, rollout.id)
        one = RP.CreateRolloutRequest(
            artifact="digits:2", selector=common_pb2.Selector(device_ids=["not-yet"]),
            strategy=RP.Strategy(waves=["100%"]),
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            client.rollouts.Create(one, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and rollout.id in err.value.details()
        client.rollouts.Resume(RP.RolloutActionRequest(id=rollout.id), timeout=10)
        wait_for(lambda: sim.digests("digits")["not-yet"] == new, 15, what="not-yet joined once resumed")
        aborted = client.rollouts.Abort(RP.RolloutActionRequest(id=rollout.id), timeout=10)
        assert aborted.state == RP.ROLLOUT_STATE_ABORTED
        _devices(sim, ["after-abort"], old)
        wait_for(lambda: len(plane.fleet.list_devices()) == 10, 10, what="registered")
        plane.fleet.label("after-abort", {"site": "lab"}, [])
        threading.Event().wait(1.0)
        assert sim.digests("digits")["after-abort"] == old, "an aborted rollout follows no more"


def test_continuous_rollout_may_start_before_any_device_matches(
    cp_factory: Callable[..., ControlPlane], sim: SimFleet, build: BuildFn
) -> None:
    plane = _plane(cp_factory)
    with ControlPlaneClient(plane.address, timeout=20) as client:
        new = client_push(client, build(version=1))
        request = RP.CreateRolloutRequest(
            artifact="digits", selector=common_pb2.Selector(match_labels={"site": "new-site"}),
            strategy=RP.Strategy(waves=["100%"], continuous=True),
        )  # fmt: skip
        rollout = client.rollouts.Create(request, timeout=10)
        assert [len(w.devices) for w in rollout.waves] == [0]
        sim.add("first", {"site": "new-site"})
        sim.connect(["first"])
        wait_for(lambda: sim.digests("digits").get("first") == new, 15, what="the first device converged")
        one_shot = RP.CreateRolloutRequest(
            artifact="digits", selector=common_pb2.Selector(match_labels={"site": "nowhere"}),
            strategy=RP.Strategy(waves=["100%"]),
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            client.rollouts.Create(one_shot, timeout=10)
        assert "--continuous" in err.value.details()


def test_cli_deploy_flags_and_resume(
    cp: ControlPlane, sim: SimFleet, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.control_plane.test_cp_cli import run

    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    with ControlPlaneClient(cp.address, timeout=20) as client:
        new = client_push(client, build(version=1))
    _devices(sim, ["c-1", "c-2"])
    wait_for(lambda: len(cp.fleet.list_devices()) == 2, 10, what="devices registered")
    code, out = run("deploy", "digits", "--to", "role=cam", "--window", "Mon-Fri 25:00-26:00")
    assert code == 2 and "does not exist" in out
    code, out = run("deploy", "digits", "--to", "role=cam", "--start-at", "tomorrow")
    assert code == 2 and "ISO 8601" in out
    code, out = run("deploy", "digits", "--to", "role=cam", "--pause-after-wave", "0")
    assert code == 2 and "numbered from 1" in out, out
    code, out = run(
        "deploy", "digits", "--to", "role=cam", "--strategy", "1,100%", "--continuous", "--start-at", "+1h",
        "--window", "Sat,Sun 22:00-02:00 UTC", "--pause-after-wave", "1", "--json",
    )  # fmt: skip
    assert code == 0, out
    doc = json.loads(out)
    strategy = doc["strategy"]
    assert strategy["continuous"] and strategy["window"] == "Sat,Sun 22:00-02:00 UTC"
    assert strategy["pause_after_waves"] == [1] and "start_at" in strategy
    assert doc["state"] == "ROLLOUT_STATE_PENDING"
    code, out = run("rollout", "abort", doc["id"])
    assert code == 0 and "aborted" in out
    # --continuous --watch returns once the initial waves are done and the rollout follows
    code, out = run(
        "deploy", "digits", "--to", "role=cam", "--strategy", "1,100%", "--continuous",
        "--pause-after-wave", "1", "--health-timeout", "5s", "--json",
    )  # fmt: skip
    rollout_id = json.loads(out)["id"]
    wait_for(lambda: cp.rollouts.get(rollout_id).rollout.state == rs.PAUSED, 15, what="paused after wave 1")
    code, out = run("rollout", "resume", rollout_id)
    assert code == 0 and "running" in out
    code, out = run("rollout", "status", rollout_id, "--watch", "--json")
    assert code == 0, out
    assert json.loads(out)["waves"][-1]["state"] == "WAVE_STATE_IN_PROGRESS"
    assert set(sim.digests("digits").values()) == {new}


def test_rollout_ls_shows_the_wave_a_paused_rollout_stopped_after(
    cp: ControlPlane, sim: SimFleet, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused after wave 1 of 2, `rollout ls` said "2/2": ``current_wave`` already names the next
    wave, which has not started. It says "1/2" until resumed, and "2/2" once wave 2 ran."""
    from tests.control_plane.test_cp_cli import run

    monkeypatch.setenv("EDGECTL_SERVER", cp.address)
    monkeypatch.setenv("COLUMNS", "300")  # one table row per rollout
    with ControlPlaneClient(cp.address, timeout=20) as client:
        client_push(client, build(version=1))
    _devices(sim, ["w-1", "w-2"])
    wait_for(lambda: len(cp.fleet.list_devices()) == 2, 10, what="devices registered")
    code, out = run(
        "deploy", "digits", "--to", "role=cam", "--strategy", "1,100%", "--pause-after-wave", "1",
        "--health-timeout", "5s", "--json",
    )  # fmt: skip
    assert code == 0, out
    rollout_id = json.loads(out)["id"]
    wait_for(lambda: cp.rollouts.get(rollout_id).rollout.state == rs.PAUSED, 15, what="paused after wave 1")

    def wave_column() -> str:
        code, out = run("rollout", "ls")
        assert code == 0, out
        row = next(line for line in out.splitlines() if rollout_id in line)
        return next(cell for cell in row.split() if "/" in cell and cell.replace("/", "").isdigit())

    assert wave_column() == "1/2"
    code, out = run("rollout", "resume", rollout_id)
    assert code == 0, out
    wait_for(lambda: cp.rollouts.get(rollout_id).rollout.state == rs.SUCCEEDED, 15, what="succeeded")
    assert wave_column() == "2/2"


def test_rollouts_stored_before_these_options_load_with_their_defaults(state_url: str) -> None:
    """No schema change: the options live in the strategy JSON, so a row an older release wrote
    (without them) reads back as a one-shot, immediate rollout with no window, on both stores."""
    from edgectl.control_plane.store import StateStore

    store = StateStore(state_url)
    old_strategy = {"waves": ["1", "100%"], "max_failures": "0", "health_timeout_s": 60}
    with store.tx() as tx:
        tx.execute(
            "INSERT INTO rollouts (id, artifact_digest, artifact_name, artifact_version, selector, strategy, "
            "state, created_at, updated_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("r-old", "sha256:" + "a" * 64, "digits", 1, json.dumps({"labels": {"site": "lab"}, "device_ids": []}),
             json.dumps(old_strategy), rs.SUCCEEDED, 1.0, 1.0, "ci"),
        )  # fmt: skip
        record = rs.get(tx, "r-old")
    spec = record.strategy
    assert (spec.continuous, spec.start_at, spec.window, spec.pause_after_waves) == (False, 0.0, "", ())
    round_trip = type(spec).from_dict(spec.to_dict())
    assert round_trip == spec
    store.close()
