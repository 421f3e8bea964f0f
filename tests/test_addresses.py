"""HOST:PORT and broker URLs: the one parser, and IPv6 literals through real servers and clients."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgectl.addresses import AddressError, HostPort, MqttUrl, parse_host_port, parse_mqtt_url
from edgectl.agent.config import load_config
from edgectl.agent.errors import ConfigError
from edgectl.broker import BrokerConfig, MosquittoProcess
from edgectl.cli import app as APP
from edgectl.client import ControlPlaneClient, resolve_server
from edgectl.control_plane.config import ControlPlaneConfig
from edgectl.control_plane.server import ControlPlane
from edgectl.doctor import check_broker
from edgectl.protos.v1 import fleet_pb2
from tests.conftest import require_mosquitto


@pytest.mark.parametrize(
    ("text", "kwargs", "want"),
    [
        ("127.0.0.1:7443", {}, HostPort("127.0.0.1", 7443)),
        (" cp.lab:7443 ", {}, HostPort("cp.lab", 7443)),
        ("[::1]:8001", {}, HostPort("::1", 8001)),
        ("[fe80::1%eth0]:8001", {}, HostPort("fe80::1%eth0", 8001)),
        (":7443", {"default_host": "0.0.0.0"}, HostPort("0.0.0.0", 7443)),
        ("127.0.0.1:0", {"listen": True}, HostPort("127.0.0.1", 0)),
    ],
)
def test_host_port_forms(text: str, kwargs: dict[str, object], want: HostPort) -> None:
    assert parse_host_port(text, **kwargs) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "kwargs", "why"),
    [
        ("nonsense", {}, "no port"),
        ("::1:8001", {}, "needs brackets"),
        ("[::1]8001", {}, "written [ADDR]:PORT"),
        ("[::1", {}, "written [ADDR]:PORT"),
        (":7443", {}, "no host"),
        ("h:http", {}, "1..65535"),
        ("h:65536", {}, "1..65535"),
        ("h:0", {}, "1..65535"),
        ("h:-1", {"listen": True}, "0..65535"),
    ],
)
def test_bad_host_port_says_what_and_how(text: str, kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(AddressError, match=r"invalid --burst") as err:
        parse_host_port(text, what="--burst", **kwargs)  # type: ignore[arg-type]
    assert why in str(err.value) and "[::1]:7443" in str(err.value)  # the hint shows the IPv6 form


def test_host_port_prints_ipv6_with_brackets_and_dials_loopback_for_a_wildcard() -> None:
    assert str(HostPort("::1", 8001)) == "[::1]:8001" and str(HostPort("cp", 1)) == "cp:1"
    assert HostPort("0.0.0.0", 7443).dialable() == HostPort("127.0.0.1", 7443)
    assert HostPort("::", 7443).dialable() == HostPort("127.0.0.1", 7443)
    assert HostPort("10.0.0.2", 7443).dialable() == HostPort("10.0.0.2", 7443)


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("mqtt://broker", MqttUrl("broker", 1883, False)),
        ("mqtts://broker", MqttUrl("broker", 8883, True)),
        ("tcp://broker:1884", MqttUrl("broker", 1884, False)),
        ("ssl://broker", MqttUrl("broker", 8883, True)),
        ("broker:1999", MqttUrl("broker", 1999, False)),
        ("mqtt://[::1]:1884", MqttUrl("::1", 1884, False)),
        ("mqtts://cp%40lab:p%2Fw@broker:8884", MqttUrl("broker", 8884, True, "cp@lab", "p/w")),
    ],
)
def test_mqtt_url_forms_and_default_ports(url: str, want: MqttUrl) -> None:
    assert parse_mqtt_url(url) == want


def test_mqtt_url_never_shows_its_password() -> None:
    url = parse_mqtt_url("mqtts://cp:s3cret@[::1]:8884")
    assert "s3cret" not in repr(url) and url.public() == "mqtts://[::1]:8884"


@pytest.mark.parametrize(
    ("url", "why"),
    [("http://broker:1883", "not an MQTT URL"), ("mqtt://", "not an MQTT URL"), ("mqtt://b:x", "port")],
)
def test_bad_mqtt_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(AddressError, match=why):
        parse_mqtt_url(url)


def test_agent_config_checks_every_address_with_the_same_rule() -> None:
    ok = load_config(
        overrides={
            "device_id": "cam-9",
            "listen": "[::1]:0",
            "burst": "[::1]:8001",
            "mqtt": "mqtt://[::1]:1883",
        }
    )
    assert ok.burst == "[::1]:8001"
    for flag, value, why in (
        ("burst", "::1:8001", "invalid --burst"),
        ("burst", "gpu:0", "invalid --burst"),  # dialled: port 0 means nothing
        ("control_plane", "cp", "invalid --control-plane"),
        ("mqtt", "http://broker", "not an MQTT URL"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_config(overrides={"device_id": "cam-9", flag: value})


def test_client_address_goes_through_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_server("grpc://[::1]:7443") == "[::1]:7443"
    with pytest.raises(AddressError, match="invalid control plane address"):
        resolve_server("cp.lab")


@pytest.mark.parametrize(
    "argv",
    [
        ["infer", "--server", "::1:8001", "--model", "m", "--input", "x.npz"],
        ["devices", "ls", "--server", "cp.lab"],
        ["broker", "config", "--out", "{tmp}/broker", "--listen", "[::1]"],
    ],
)
def test_cli_commands_refuse_a_bad_address_before_doing_anything(argv: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(APP, [a.format(tmp=tmp_path) for a in argv])
    assert isinstance(result.exception, AddressError), result.output
    assert "[::1]:7443" in str(result.exception)
    assert not (tmp_path / "broker").exists()


def test_ipv6_literals_through_a_real_broker_control_plane_and_client(tmp_path: Path) -> None:
    """mosquitto on [::1], the control plane's listener on [::1]:0, the doctor and the client dial it."""
    broker = MosquittoProcess(
        BrokerConfig(host="::1", data_dir=tmp_path / "broker"), binary=require_mosquitto()
    )
    broker.start()
    try:
        assert broker.url == f"mqtt://[::1]:{broker.port}"
        check = check_broker(broker.url)
        assert check.reachable and "CONNACK" in check.detail, check.detail
        config = ControlPlaneConfig(
            listen="[::1]:0",
            insecure=True,
            mqtt_url=broker.url,
            state_url=f"sqlite:///{tmp_path}/cp.db",
            blobs=str(tmp_path / "blobs"),
            tick_seconds=0.1,
            leader_interval=0.2,
        )
        cp = ControlPlane(config)
        cp.start()
        try:
            assert cp.address == f"[::1]:{cp.port}" and cp.port > 0
            assert cp.bus.wait_connected(10), "the control plane did not reach the broker over IPv6"
            with ControlPlaneClient(resolve_server(cp.address), timeout=10) as client:
                assert client.call(client.fleet.ListDevices, fleet_pb2.ListDevicesRequest()).devices == []
        finally:
            cp.stop(grace=0)
    finally:
        broker.kill()
