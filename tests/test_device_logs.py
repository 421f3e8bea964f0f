"""`edgectl devices logs`: an agent's recent lines over MQTT request/response, on a real `edgectl up` fleet.

Promises: an admin gets the agent's lines; a viewer or deployer is refused; each call is audited;
what reaches the operator is bounded and redacted even when a device sends too much or a secret;
one device cannot read another's logs off the broker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgectl.client import ControlPlaneClient, resolve_credentials
from edgectl.control_plane.security import TOKEN_KEY_FILE
from edgectl.endpoints import Endpoints
from edgectl.mqtt.wire import DeviceTopics, decode, encode
from edgectl.protos.v1 import fleet_pb2, mqtt_pb2
from edgectl.protos.v1 import rollouts_pb2 as RP
from edgectl.security.tokens import Role, TokenIssuer
from tests.harness.upfleet import edgectl, enroll_rogue, fleet_env, up_fleet

SECRET_TOKEN = "edgectl.c2VjcmV0Y2xhaW1z.c2lnbmF0dXJlc2ln"


def test_devices_logs_admin_only_audited_bounded_redacted(tmp_path: Path) -> None:
    with up_fleet(tmp_path, agents=1) as (data, _key):
        env = fleet_env(tmp_path, data)
        endpoints = Endpoints.read(data)
        got = edgectl("devices", "logs", "edge-1", "--since", "10m", "-o", "json", env=env, timeout=60)
        assert got.returncode == 0, got.stderr
        lines = [json.loads(ln) for ln in got.stdout.splitlines()]
        assert any("connected to" in ln["text"] for ln in lines), lines[:5]
        assert all(ln["at"] > time.time() - 600 for ln in lines)
        assert {"edgectl.agent.mqtt_link"} <= {ln["logger"] for ln in lines}
        # a viewer and a deployer are refused (PERMISSION_DENIED), with nothing printed
        issuer = TokenIssuer.load_or_create(data / "security" / TOKEN_KEY_FILE)
        for role in (Role.VIEWER, Role.DEPLOYER):
            refused = edgectl(
                "devices", "logs", "edge-1", env={**env, "EDGECTL_TOKEN": issuer.issue("pat", role)}
            )
            assert refused.returncode != 0 and not refused.stdout
            assert "needs the admin role" in " ".join(refused.stderr.split()), refused.stderr
        # --follow keeps asking until Ctrl-C, which ends it with success
        follow = subprocess.Popen([sys.executable, "-m", "edgectl", "devices", "logs", "edge-1", "--follow", "--json"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert follow.stdout is not None and json.loads(follow.stdout.readline())["logger"]
        time.sleep(3)  # at least one more ask
        follow.send_signal(signal.SIGINT)
        _out, err = follow.communicate(timeout=30)
        assert follow.returncode == 0, err
        text = edgectl("devices", "logs", "edge-1", "--since", "1h", "-n", "3", env=env)
        assert text.returncode == 0 and len(text.stdout.splitlines()) == 3, text.stdout
        assert "older lines left out" in text.stderr
        with ControlPlaneClient(
            endpoints.control_plane, credentials=resolve_credentials(data_dir=data)
        ) as client:
            audit = client.call(client.audit.List, RP.ListAuditRequest()).entries
            reads = [e for e in audit if e.action.endswith("FleetService/DeviceLogs")]
            assert {(e.actor.identity, e.target, e.outcome) for e in reads} >= {
                ("edgectl-up", "edge-1", "OK"), ("pat", "", "PERMISSION_DENIED")
            }, reads  # fmt: skip
            rogue = enroll_rogue(client, endpoints, "rogue-1")
        try:
            # attack: a device listens for another device's answers; positive control: the operator gets them
            suback = rogue.subscribe(DeviceTopics("edge-1").logs_response)
            control = edgectl("devices", "logs", "edge-1", env=env)
            assert control.returncode == 0 and control.stdout
            assert all(r.is_failure for r in suback) or rogue.nothing_arrives(1.0)
            # a device that answers with far too much, secrets included: bounded and redacted on the way
            assert not any(r.is_failure for r in rogue.subscribe(DeviceTopics("rogue-1").logs_request))
            cli = subprocess.Popen([sys.executable, "-m", "edgectl", "devices", "logs", "rogue-1", "--json", "-n", "50"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            request = decode(rogue.expect(timeout=30).payload, mqtt_pb2.LogRequest)
            assert request.max_lines == 50 and request.max_bytes > 0
            now = time.time()
            flood = [fleet_pb2.LogLine(at=now, level="info", logger="x", text=f"line {i} password=hunter2 {SECRET_TOKEN}")
                     for i in range(3000)]  # fmt: skip
            answer = mqtt_pb2.LogResponse(request_id=request.request_id, device_id="rogue-1", lines=flood)
            rogue.publish(DeviceTopics("rogue-1").logs_response, encode(answer))
            out, err = cli.communicate(timeout=60)
        finally:
            rogue.close()
        assert cli.returncode == 0, err
        shown = [json.loads(ln) for ln in out.splitlines()]
        assert len(shown) == 50 and shown[-1]["text"].startswith("line 2999 ")
        assert "hunter2" not in out and SECRET_TOKEN not in out
        assert "password=[redacted]" in shown[0]["text"]
