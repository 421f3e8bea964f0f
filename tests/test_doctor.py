"""``edgectl doctor`` against a real mosquitto, a closed port and a silent TCP server."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgectl.cli.doctor import doctor
from edgectl.devices import detect
from edgectl.doctor import check_broker, run_doctor

MOSQUITTO = "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_mosquitto(tmp_path: Path, anonymous: bool) -> Iterator[str]:
    if not os.path.exists(MOSQUITTO):
        message = "mosquitto is not installed: apt-get install -y mosquitto"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    cfg = tmp_path / f"mosquitto-{port}.conf"
    cfg.write_text(f"listener {port} 127.0.0.1\nallow_anonymous {'true' if anonymous else 'false'}\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"mosquitto did not start on {port}: {out}")
                time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    yield from _start_mosquitto(tmp_path, anonymous=True)


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[str]:
    yield from _start_mosquitto(tmp_path, anonymous=False)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and never answers: a port that is open but not MQTT."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"mqtt://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_report_with_reachable_broker(broker: str) -> None:
    report = run_doctor(broker)
    assert report.mqtt.reachable, report.mqtt.detail
    assert report.mqtt.url == broker and "CONNACK" in report.mqtt.detail
    assert report.mqtt.latency_ms is not None and report.mqtt.latency_ms < 2000
    assert report.profile == detect().profile.name
    assert report.cpu_int8_features == report.facts.int8_features()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["mqtt"]["reachable"] is True
    assert data["profile"]["name"] == report.profile
    assert data["cpu"]["int8_features"]["avx2"] == ("avx2" in report.facts.cpu_flags)
    assert data["onnxruntime"]["providers"] == list(report.facts.onnxruntime_providers)
    assert (data["cuda"]["absent_reason"] is None) == bool(report.facts.cuda_devices)


def test_closed_port_is_unreachable() -> None:
    url = f"mqtt://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    report = run_doctor(url)
    assert not report.mqtt.reachable
    assert "refused" in report.mqtt.detail.lower()
    assert time.monotonic() - started < 5


def test_broker_that_refuses_the_client(locked_broker: str) -> None:
    check = check_broker(locked_broker)
    assert not check.reachable
    assert "refused" in check.detail and "authorized" in check.detail.lower()


def test_open_port_without_connack_times_out(silent_server: str) -> None:
    started = time.monotonic()
    check = check_broker(silent_server, timeout_s=0.5)
    assert not check.reachable and "no CONNACK within 0.5s" in check.detail
    assert time.monotonic() - started < 2


def test_bad_url_is_reported_not_raised() -> None:
    assert "not an MQTT URL" in check_broker("http://127.0.0.1:1883").detail
    assert "not a number" in check_broker("mqtt://127.0.0.1:notaport").detail


def test_env_names_the_default_broker(broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECTL_MQTT", broker)
    report = run_doctor(None)
    assert report.mqtt.url == broker and report.mqtt.reachable


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("doctor")(doctor)
    # A second command keeps typer from collapsing the app into the doctor command itself.
    app.command("noop")(lambda: None)
    return app


def test_cli_json_and_table(broker: str) -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), ["doctor", "--json", "--mqtt", broker])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mqtt"]["reachable"] is True and data["profile"]["name"] == detect().profile.name

    closed = f"mqtt://127.0.0.1:{_free_port()}"
    result = runner.invoke(_app(), ["doctor"], env={"EDGECTL_MQTT": closed, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output  # doctor reports; an absent broker is not a failure
    assert "device profile" in result.stdout and detect().profile.name in result.stdout
    assert "unreachable" in result.stdout and closed in result.stdout
    if importlib.util.find_spec("tensorrt") is None:
        # Reasons carry install hints with brackets; rich must print them, not eat them as markup.
        assert "edgectl[tensorrt]" in result.stdout

    result = runner.invoke(_app(), ["doctor", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Example: edgectl doctor" in result.stdout


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto-clients")
def test_broker_fixture_is_a_real_mosquitto(broker: str) -> None:
    # Cross-check with the stock client so the fixture cannot be mistaken for a fake.
    port = broker.rsplit(":", 1)[1]
    out = subprocess.run(
        ["mosquitto_sub", "-p", port, "-t", "$SYS/broker/version", "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mosquitto" in out.stdout.lower()
