"""`edgectl devices bundle`: one device's support bundle over the logs channel, on a real `edgectl up` fleet.

Promises: an admin gets a .tar.gz whose device.json, agent.json and logs.txt parse and hold the
device's config (no secret-named settings), versions, doctor report and lines; no token or password
leaves, even when a device sends them; a viewer is refused; an offline device is a clear error.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from edgectl.client import ControlPlaneClient, push_artifact, resolve_credentials
from edgectl.control_plane.security import TOKEN_KEY_FILE
from edgectl.endpoints import Endpoints
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import fleet_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.tokens import Role, TokenIssuer
from tests.agent.onnx_models import mlp_artifact
from tests.harness.upfleet import edgectl, enroll_rogue, fleet_env, start_rollout, up_fleet, wait_rollout

SECRET_TOKEN = "edgectl.c2VjcmV0Y2xhaW1z.c2lnbmF0dXJlc2ln"
ANY_TOKEN = re.compile(r"edgectl\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def _members(path: Path) -> dict[str, str]:
    with tarfile.open(path, "r:gz") as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read().decode()
        return out


def test_devices_bundle_admin_only_redacted_offline_is_an_error(tmp_path: Path) -> None:
    with up_fleet(tmp_path, agents=1) as (data, key):
        env = fleet_env(tmp_path, data)
        endpoints = Endpoints.read(data)
        art = mlp_artifact(tmp_path / "art", tmp_path / "models", key, version=1)
        with ControlPlaneClient(
            endpoints.control_plane, credentials=resolve_credentials(data_dir=data)
        ) as client:
            digest = push_artifact(client, art.root).artifact.ref.digest
            done = wait_rollout(client, start_rollout(client, digest, {"tier": "edge"}))
            assert done.state == RP.ROLLOUT_STATE_SUCCEEDED, done
        out = tmp_path / "b" / "edge-1.tar.gz"
        got = edgectl("devices", "bundle", "edge-1", "--out", str(out), env=env, timeout=90)
        assert got.returncode == 0, got.stderr
        assert str(out) in got.stdout
        files = _members(out)
        assert set(files) == {"device.json", "agent.json", "logs.txt"}
        device = json.loads(files["device.json"])
        assert device["device"]["id"] == "edge-1" and device["device"]["online"]
        agent = json.loads(files["agent.json"])
        config = agent["config"]
        # the agent was started with a one-time enrollment token in its config: it must not leave
        assert config["device_id"] == "edge-1" and config["listen"].startswith("127.0.0.1:")
        assert not [k for k in config if re.search("token|key|passw|credential", k)], sorted(config)
        assert agent["versions"]["agent"] and agent["versions"]["python"] and agent["versions"]["onnxruntime"]
        assert agent["versions"]["os"]
        served = {(m["name"], m["version"], m["digest"], m["active"]) for m in agent["versions"]["models"]}
        assert ("mlp", 1, digest, True) in served, agent["versions"]
        assert agent["doctor"]["mqtt"]["reachable"] is True and agent["doctor"]["cpu"]["arch"]
        assert "connected to" in files["logs.txt"]
        for text in files.values():
            assert not ANY_TOKEN.search(text) and "hunter2" not in text
        # a viewer is refused, nothing written
        issuer = TokenIssuer.load_or_create(data / "security" / TOKEN_KEY_FILE)
        viewer_out = tmp_path / "viewer.tar.gz"
        refused = edgectl("devices", "bundle", "edge-1", "--out", str(viewer_out),
                          env={**env, "EDGECTL_TOKEN": issuer.issue("pat", Role.VIEWER)})  # fmt: skip
        assert refused.returncode != 0 and not viewer_out.exists()
        assert "needs the admin role" in " ".join(refused.stderr.split()), refused.stderr
        with ControlPlaneClient(
            endpoints.control_plane, credentials=resolve_credentials(data_dir=data)
        ) as client:
            audit = client.call(client.audit.List, RP.ListAuditRequest()).entries
            reads = {
                (e.actor.identity, e.target, e.outcome) for e in audit if e.action.endswith("DeviceLogs")
            }
            assert ("edgectl-up", "edge-1", "OK") in reads, reads  # the bundle's ask of the device is audited
            rogue = enroll_rogue(client, endpoints, "rogue-1")
        try:
            # enrolled but never online: a clear error, at once, and no file
            offline_out = tmp_path / "offline.tar.gz"
            offline = edgectl("devices", "bundle", "rogue-1", "--out", str(offline_out), env=env, timeout=60)
            assert offline.returncode == 7 and not offline_out.exists()  # not possible in this state
            assert "rogue-1 is offline" in " ".join(offline.stderr.split()), offline.stderr
            # a device that answers with secrets in its bundle and lines: dropped and redacted on the way
            topics = DeviceTopics("rogue-1")
            rogue.publish(
                topics.status, encode(mqtt_pb2.DeviceStatus(device_id="rogue-1", online=True)), retain=True
            )
            assert not any(r.is_failure for r in rogue.subscribe(topics.logs_request))
            rogue_out = tmp_path / "rogue.tar.gz"
            cli = subprocess.Popen([sys.executable, "-m", "edgectl", "devices", "bundle", "rogue-1", "--out", str(rogue_out)],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            request = decode(rogue.expect(timeout=30).payload, mqtt_pb2.LogRequest)
            assert request.bundle
            planted = {"config": {"device_id": "rogue-1", "mqtt_password": "hunter2", "api_key": "hunter2",
                                  "mqtt": "mqtts://dev:hunter2@broker:8883", "note": f"token={SECRET_TOKEN}"}}  # fmt: skip
            line = fleet_pb2.LogLine(
                at=1.0, level="info", logger="x", text=f"password=hunter2 {SECRET_TOKEN}"
            )
            answer = mqtt_pb2.LogResponse(request_id=request.request_id, device_id="rogue-1", lines=[line],
                                          bundle_json=json.dumps(planted))  # fmt: skip
            rogue.publish(topics.logs_response, encode(answer))
            _stdout, err = cli.communicate(timeout=60)
        finally:
            rogue.close()
        assert cli.returncode == 0, err
        files = _members(rogue_out)
        assert json.loads(files["agent.json"])["config"] == {
            "device_id": "rogue-1", "mqtt": "mqtts://dev:[redacted]@broker:8883", "note": "token=[redacted]"
        }  # fmt: skip
        assert "password=[redacted]" in files["logs.txt"]
        for text in files.values():
            assert "hunter2" not in text and SECRET_TOKEN not in text


def test_redact_settings_drops_secret_names_and_redacts_what_is_left() -> None:
    from edgectl.redact import redact_settings

    got = redact_settings({"enroll_token": "x", "tls_key": "/k.pem", "burst_token_file": "/t", "mqtt_password": "p",
                           "ca_file": "/ca.pem", "mqtt": "mqtts://dev:hunter2@h:8883", "heartbeat_s": 30.0,
                           "trust": [Path("/keys")], "labels": {"note": "password=hunter2"}})  # fmt: skip
    assert got == {"ca_file": "/ca.pem", "mqtt": "mqtts://dev:[redacted]@h:8883", "heartbeat_s": 30.0,
                   "trust": ["/keys"], "labels": {"note": "password=[redacted]"}}  # fmt: skip


def test_control_plane_leaves_out_a_bundle_too_big_or_not_an_object() -> None:
    from edgectl.control_plane.device_logs import MAX_BUNDLE_BYTES, _checked_bundle
    from edgectl.control_plane.errors import Unavailable

    big = json.dumps({"config": {"x": "a" * MAX_BUNDLE_BYTES}})
    assert "left out" in json.loads(_checked_bundle("d", big))["error"]
    assert "not a JSON object" in json.loads(_checked_bundle("d", "[1, 2]"))["error"]
    assert json.loads(_checked_bundle("d", '{"config": {"api_key": "k", "a": 1}}')) == {"config": {"a": 1}}
    try:
        _checked_bundle("d", "")  # an older agent answers with lines only
    except Unavailable as exc:
        assert "predates" in str(exc)
    else:
        raise AssertionError("an answer without a bundle must be an error")
