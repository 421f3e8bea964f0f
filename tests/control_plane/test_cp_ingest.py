"""The leader's MQTT ingest: reports are stored and wake the controller with the devices that
reported; events are read by kind, and only failures are decoded and logged, so an old agent's
progress event every second costs little."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from edgectl.broker import MosquittoProcess
from edgectl.control_plane.bus import CONNECTED, FleetBus, Inbound
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.ingest import FleetIngest
from edgectl.control_plane.store import StateStore
from edgectl.mqtt.wire import DeviceTopics, encode
from edgectl.protos.v1 import mqtt_pb2
from tests.harness.mqtt import MqttTestClient


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    s = StateStore(state_url)
    yield s
    s.close()


class Rig:
    def __init__(self, store: StateStore) -> None:
        self.fleet = Fleet(store)
        self.woken: list[set[str]] = []
        self.counts: Counter[str] = Counter()
        bus = FleetBus("mqtt://127.0.0.1:1")  # never started: handle() is fed directly
        self.ingest = FleetIngest(
            store,
            self.fleet,
            bus,
            self.woken.append,
            lambda kind: self.counts.update([kind]),
            republish=lambda: 0,
        )

    def feed(self, *items: tuple[str, bytes]) -> None:
        self.ingest.handle([Inbound(topic, payload) for topic, payload in items])


def _event(device_id: str, kind: int, message: str, done: int = 0, total: int = 0) -> tuple[str, bytes]:
    event = mqtt_pb2.DeviceEvent(device_id=device_id, kind=kind, message=message, bytes_done=done,
                                 bytes_total=total)  # fmt: skip
    return DeviceTopics(device_id).events, encode(event)


def test_an_old_agents_progress_every_second_is_counted_not_logged(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(store)
    state = mqtt_pb2.ReportedState(device_id="cam-1", observed_generation=3, agent_version="0.9")
    state.models.add(name="digits", digest="sha256:" + "1" * 64, version=2, smoke_test_passed=True)
    progress = [_event("cam-1", mqtt_pb2.EVENT_KIND_FETCH_PROGRESS, "downloading", i, 60) for i in range(60)]
    with caplog.at_level(logging.WARNING, logger="edgectl.control_plane.ingest"):
        rig.feed(
            *progress,
            _event("cam-1", mqtt_pb2.EVENT_KIND_FAILED, "no space left on device"),
            (DeviceTopics("cam-1").reported, encode(state)),
        )
    assert rig.counts["events"] == 61 and rig.counts["reported"] == 1
    assert rig.woken == [{"cam-1"}]
    device = rig.fleet.get("cam-1")
    assert device.observed_generation == 3 and device.models["digits"].version == 2
    logged = [r for r in caplog.records if r.getMessage() == "device event"]
    assert [getattr(r, "detail", "") for r in logged] == ["no space left on device"]


def test_a_malformed_event_is_counted_as_such(store: StateStore) -> None:
    rig = Rig(store)
    rig.feed((DeviceTopics("cam-1").events, b"not json"), (DeviceTopics("cam-1").events, b'{"kind": []}'))
    assert rig.counts["bad_payload"] == 1 and rig.counts["events"] == 1  # a list for a kind: not ours to log
    assert rig.woken == []


def test_a_payload_nested_too_deep_or_with_a_key_twice_is_one_bad_payload(store: StateStore) -> None:
    """A reported state or event nested deeper than json parses raised RecursionError past
    load_json: the whole batch failed, and with it the reports of the other devices in it. A key
    given twice was stored as whichever came last."""
    rig = Rig(store)
    bad = DeviceTopics("cam-1")
    rig.feed(
        (bad.reported, b"[" * 100_000),
        (bad.events, b'{"kind": ' * 50_000),
        (bad.reported, b'{"deviceId": "cam-1", "observedGeneration": "1", "observedGeneration": "9"}'),
        _report("cam-2"),
    )
    assert rig.counts["bad_payload"] == 3 and rig.counts["reported"] == 1
    assert rig.woken == [{"cam-2"}]
    assert rig.fleet.get("cam-2").observed_generation == 3


def test_reports_of_a_batch_wake_the_controller_with_those_devices_only(store: StateStore) -> None:
    rig = Rig(store)
    rig.feed(*[(DeviceTopics(f"d{i}").status, encode(mqtt_pb2.DeviceStatus(online=True))) for i in range(3)])
    rig.feed((DeviceTopics("d1").reported, encode(mqtt_pb2.ReportedState(device_id="d1"))))
    assert rig.woken == [{"d0", "d1", "d2"}, {"d1"}]
    assert all(rig.fleet.get(f"d{i}").online for i in range(3))
    assert time.time() - (rig.fleet.get("d1").last_seen or 0) < 60


@pytest.mark.parametrize("device_events", [False, True])
def test_the_leader_hears_events_only_when_asked(mosquitto: MosquittoProcess, device_events: bool) -> None:
    bus = FleetBus(mosquitto.url, device_events=device_events)
    bus.start()
    device = MqttTestClient(mosquitto.host, mosquitto.port)
    try:
        assert bus.wait_connected(10) and not device.connect().is_failure
        bus.subscribe_fleet()
        assert bus.inbox.get(timeout=5).topic == CONNECTED
        time.sleep(0.5)  # the subscriptions reach the broker
        device.publish(*_event("cam-1", mqtt_pb2.EVENT_KIND_FAILED, "no space left"))
        device.publish(DeviceTopics("cam-1").reported, encode(mqtt_pb2.ReportedState(device_id="cam-1")))
        got = [bus.inbox.get(timeout=5).topic]  # QoS 1 from one client: in order
        time.sleep(0.3)
        while not bus.inbox.empty():
            got.append(bus.inbox.get_nowait().topic)
        assert [t.rsplit("/", 1)[1] for t in got] == (
            ["events", "reported"] if device_events else ["reported"]
        )
    finally:
        device.close()
        bus.stop()


def _report(device_id: str, digest: str = "1", requests: int = 0) -> tuple[str, bytes]:
    """A heartbeat-like report: a fresh timestamp every time, the rest as given."""
    state = mqtt_pb2.ReportedState(device_id=device_id, observed_generation=3, agent_version="0.9")
    state.models.add(name="digits", digest="sha256:" + digest * 64, version=2, smoke_test_passed=True)
    state.stats.requests = requests
    state.reported_at.GetCurrentTime()
    return DeviceTopics(device_id).reported, encode(state)


def _last_seen(store: StateStore, device_id: str) -> float:
    with store.tx() as tx:
        return float(tx.scalar("SELECT last_seen FROM devices WHERE id = ?", (device_id,)))


def test_a_report_that_changes_nothing_is_not_written_until_the_last_seen_flush(store: StateStore) -> None:
    rig = Rig(store)
    rig.feed(_report("cam-1"))
    first = _last_seen(store, "cam-1")
    time.sleep(0.01)
    rig.feed(_report("cam-1"))  # only its timestamp is new: no transaction, no controller step
    assert rig.woken == [{"cam-1"}] and rig.counts["reported"] == 2
    assert _last_seen(store, "cam-1") == first
    rig.ingest.flush_seen()
    assert _last_seen(store, "cam-1") > first
    rig.feed(_report("cam-1", requests=5))  # anything else that changed is written at once
    assert rig.woken == [{"cam-1"}, {"cam-1"}]
    assert rig.fleet.get("cam-1").stats["requests"] == 5


def test_a_row_changed_elsewhere_gets_the_stored_report_back_at_the_flush(store: StateStore) -> None:
    rig = Rig(store)
    rig.feed(_report("cam-1", digest="1"))
    with store.tx() as tx:  # e.g. decommissioned and enrolled again through another replica
        tx.execute("UPDATE devices SET models = ? WHERE id = ?", ("{}", "cam-1"))
    rig.feed(_report("cam-1", digest="1"))
    assert rig.fleet.get("cam-1").models == {}  # not yet: the report looked unchanged
    rig.ingest.flush_seen()
    assert rig.fleet.get("cam-1").models["digits"].digest == "sha256:" + "1" * 64
    assert rig.woken == [{"cam-1"}, {"cam-1"}]


def test_a_new_term_as_leader_writes_the_first_report_in_full(store: StateStore) -> None:
    rig = Rig(store)
    rig.feed(_report("cam-1", digest="1"))
    with store.tx() as tx:  # another leader stored a newer report, then this replica leads again
        tx.execute("UPDATE devices SET models = ? WHERE id = ?", ("{}", "cam-1"))
    rig.ingest.start()
    rig.ingest.stop()
    rig.feed(_report("cam-1", digest="1"))
    assert rig.fleet.get("cam-1").models["digits"].version == 2


def test_a_decommissioned_device_is_not_brought_back_by_the_flush(store: StateStore) -> None:
    rig = Rig(store)
    rig.feed(_report("cam-1"))
    rig.fleet.decommission("cam-1")
    rig.feed(_report("cam-1"))
    rig.ingest.flush_seen()
    assert [d.id for d in rig.fleet.list_devices()] == []
