"""The real-broker harness: retained QoS 1 MQTT v5 messages survive a broker restart."""

from __future__ import annotations

import queue

import pytest

from edgectl.broker import BrokerConfig, MosquittoProcess
from edgectl.mqtt.wire import DeviceTopics
from tests.harness.mqtt import MqttTestClient


def test_retained_qos1_message_survives_broker_restart(mosquitto: MosquittoProcess) -> None:
    topic = DeviceTopics("dev-1").desired
    publisher = MqttTestClient(mosquitto.host, mosquitto.port)
    assert not publisher.connect().is_failure
    publisher.publish(topic, b'{"generation": "1"}', qos=1, retain=True)
    publisher.close()

    first = MqttTestClient(mosquitto.host, mosquitto.port)
    first.connect()
    assert [r.value for r in first.subscribe(topic, qos=1)] == [1]  # granted QoS 1
    got = first.expect()
    assert (got.topic, got.payload, got.retain) == (topic, b'{"generation": "1"}', True)
    first.close()

    mosquitto.restart()

    after = MqttTestClient(mosquitto.host, mosquitto.port)
    after.connect()
    after.subscribe(topic, qos=1)
    again = after.expect()
    assert (again.payload, again.retain) == (b'{"generation": "1"}', True)
    after.close()


def test_killed_broker_loses_nothing_already_autosaved(mosquitto: MosquittoProcess) -> None:
    """SIGKILL is a crash: what the 1 s autosave wrote before it is still retained after restart."""
    topic = DeviceTopics("dev-2").desired
    client = MqttTestClient(mosquitto.host, mosquitto.port)
    client.connect()
    client.publish(topic, b"v2", qos=1, retain=True)
    client.close()
    db = mosquitto.config.data_dir / "mosquitto.db"
    import time

    deadline = time.monotonic() + 10
    while not db.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # one more autosave interval after the message arrived
    mosquitto.kill()
    mosquitto.start()
    reader = MqttTestClient(mosquitto.host, mosquitto.port)
    reader.connect()
    reader.subscribe(topic)
    assert reader.expect().payload == b"v2"
    reader.close()


def test_config_change_takes_effect_on_restart(mosquitto: MosquittoProcess) -> None:
    mosquitto.config.allow_anonymous = False
    mosquitto.restart()
    client = MqttTestClient(mosquitto.host, mosquitto.port)
    try:
        reason = client.connect()
    except queue.Empty:
        pytest.fail("no CONNACK from the reconfigured broker")
    assert reason.is_failure  # anonymous clients are now refused
    client.close()


def test_broker_start_failure_reports_the_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import require_mosquitto

    binary = require_mosquitto()
    broker = MosquittoProcess(
        BrokerConfig(data_dir=tmp_path, extra_lines=["this_is_not_an_option 1"]), binary=binary
    )
    with pytest.raises(Exception, match="did not start"):
        broker.start(timeout=3)
