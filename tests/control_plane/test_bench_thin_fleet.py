"""The benchmark's thin fleet over child processes (benchmarks/thin_fleet.py) against a real
mosquitto: every device connects and reports, a desired state reaches the one it names and is
counted, a heartbeat round re-reports every device, and closing says each one offline."""

from __future__ import annotations

from pathlib import Path

from benchmarks.thin_fleet import ThinFleet
from edgectl.broker import MosquittoProcess
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import mqtt_pb2
from tests.control_plane.sim_device import wait_for
from tests.harness.mqtt import MqttTestClient

OLD, NEW = "sha256:" + "aa" * 32, "sha256:" + "bb" * 32


def test_thin_fleet_spreads_devices_over_processes_and_answers(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    ids = [f"thin-{i}" for i in range(5)]
    watcher = MqttTestClient(mosquitto.host, mosquitto.port)
    assert not watcher.connect().is_failure
    watcher.subscribe("edgectl/v1/devices/+/reported")
    fleet = ThinFleet(tmp_path, mosquitto.host, mosquitto.port, ids, {"fleet": "t"},
                      {"digits": {"digest": OLD, "version": 1}}, per_process=2)  # fmt: skip
    try:
        assert len(fleet.pids()) == 3  # 2 + 2 + 1
        fleet.connect(timeout=30)
        reported = {decode(watcher.expect().payload, mqtt_pb2.ReportedState).device_id for _ in ids}
        assert reported == set(ids)
        assert fleet.count_digest("digits", OLD) == 5
        assert fleet.count_digest("digits", NEW) == 0
        assert fleet.messages() == 10  # each: its online status and its first report

        desired = mqtt_pb2.DesiredState(
            generation=1, models=[mqtt_pb2.DesiredModel(name="digits", digest=NEW, version=2)]
        )
        watcher.publish(DeviceTopics("thin-3").desired, encode(desired), retain=True)
        wait_for(
            lambda: fleet.count_digest("digits", NEW) == 1, 10, interval=0.1, what="thin-3 on the new digest"
        )
        report = decode(watcher.expect().payload, mqtt_pb2.ReportedState)
        assert (report.device_id, report.models[0].digest) == ("thin-3", NEW)

        assert fleet.heartbeat() == 5
        again = {decode(watcher.expect().payload, mqtt_pb2.ReportedState).device_id for _ in ids}
        assert again == set(ids)
        assert fleet.messages() == 10 + 2 + 5
    finally:
        fleet.close()
    assert [c.returncode for c in fleet.children] == [0, 0, 0]
    assert not list((tmp_path / "thin").glob("*.json"))  # the specs (passwords) are gone
    status = MqttTestClient(mosquitto.host, mosquitto.port)
    assert not status.connect().is_failure
    status.subscribe("edgectl/v1/devices/+/status")
    offline = [decode(status.expect().payload, mqtt_pb2.DeviceStatus) for _ in ids]
    assert {s.device_id for s in offline} == set(ids) and not any(s.online for s in offline)
    status.close()
    watcher.close()
