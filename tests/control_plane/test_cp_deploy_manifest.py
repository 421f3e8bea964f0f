"""The Kubernetes manifest starts: its migration Job and its control-plane container run on this
machine with exactly the manifest's command, args, env and mounted files, and answer the probes.

What a cluster would provide is provided for real: the Secrets are made with the commands the
manifest's header gives, mounted files land in a temp root at their mount paths (paths in args and
env are rewritten to it), container ports map to free loopback ports, PostgreSQL, a TLS mosquitto
with dynamic security and an S3 server (moto) stand in for the site's. Only the ConfigMap's
site-specific addresses are overridden, and the test checks it overrides nothing else.
"""

from __future__ import annotations

import contextlib
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgectl.artifact import Artifact
from edgectl.broker import MosquittoProcess
from edgectl.client import ClientCredentials, ControlPlaneClient, push_artifact
from edgectl.ports import free_port, wait_for_port
from edgectl.protos.v1 import fleet_pb2
from edgectl.security.broker_files import write_broker_files
from tests.conftest import S3Endpoint, require_mosquitto
from tests.control_plane.conftest import BuildFn
from tests.test_deploy_files import manifest_documents

EDGECTL = Path(sys.executable).parent / "edgectl"
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class Pod:
    """One container of the manifest, materialized on this machine."""

    root: Path
    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int]  # containerPort -> loopback port here
    writable: list[Path] = field(default_factory=list)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are substituted, others stay as written."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def materialize(
    pod_spec: dict[str, Any],
    root: Path,
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, bytes]],
) -> Pod:
    """The pod's only container as a command line, environment and files under ``root``."""
    (container,) = pod_spec["containers"]
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    root.mkdir(parents=True, exist_ok=True)
    mounts: dict[str, Path] = {}
    writable: list[Path] = []
    for mount in container.get("volumeMounts", []):
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = target
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            writable.append(target)
            continue
        if "secret" in volume:
            source, data = volume["secret"], secrets[volume["secret"]["secretName"]]
        else:
            source, data = (
                volume["configMap"],
                {k: v.encode() for k, v in config_maps[volume["configMap"]["name"]].items()},
            )
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            assert item["key"] in data, (
                f"{mount['name']} mounts key {item['key']!r} that the test's secret lacks"
            )
            path = target / item["path"]
            path.write_bytes(data[item["key"]])
            path.chmod(source.get("defaultMode", 0o644))

    # One pass, longest mount first, and only at a path's start: a rewritten path is never rewritten again.
    mounted = re.compile(
        r"(?<![\w/])(" + "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True)) + r")(?=/|$)"
    )

    def local(text: str) -> str:
        return mounted.sub(lambda m: str(mounts[m.group(1)]), text) if mounts else text

    ports = {p["containerPort"]: free_port() for p in container.get("ports", [])}
    env: dict[str, str] = {"PATH": f"{EDGECTL.parent}:/usr/bin:/bin"}  # what the image's PATH would hold
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = local(_expand(var["value"], env))
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            env[var["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]].decode()
        else:
            env[var["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]

    def port_mapped(arg: str) -> str:
        for container_port, here in ports.items():
            arg = arg.replace(f"0.0.0.0:{container_port}", f"127.0.0.1:{here}")
        return arg

    command = [str(EDGECTL) if c == "edgectl" else c for c in container["command"]]
    argv = command + [port_mapped(local(_expand(a, env))) for a in container.get("args", [])]
    return Pod(root, argv, env, ports, writable)


def _snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file outside the writable mounts, with its size and mtime."""
    out: dict[str, tuple[int, int]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _health(port: int, timeout: float) -> int:
    """What kubelet's gRPC probe sees: plaintext grpc.health.v1 Check on the port."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return int(reply.status)


@dataclass
class Site:
    """What the cluster and the site provide: the secrets' source dir, a broker, a bucket."""

    security_dir: Path
    broker: MosquittoProcess
    s3: S3Endpoint
    state_url: str


@pytest.fixture
def site(tmp_path: Path, postgres_url: str, moto_s3: S3Endpoint) -> Iterator[Site]:
    binary = require_mosquitto()
    fleet = tmp_path / "fleet"
    port = free_port()
    # The recipe in the manifest's header, run as a person would.
    for argv in (["control-plane", "init", "--security-dir", str(fleet)],
                 ["broker", "config", "--out", str(fleet), "--hostname", "127.0.0.1", "--listen", f"127.0.0.1:{port}"]):  # fmt: skip
        done = subprocess.run([str(EDGECTL), *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    layout = write_broker_files(
        fleet, hostnames=["127.0.0.1"], host="127.0.0.1", port=port
    )  # same files, kept
    broker = MosquittoProcess(layout.broker_config(tmp_path / "broker-data"), binary=binary)
    broker.start()
    # The files travel into the Secret and the workstation's directory goes away, so the absolute CA
    # path written in control-plane-credentials.json no longer exists: the mounted ca.crt must serve.
    moved = fleet.rename(tmp_path / "secret-source")
    client: Any = moto_s3.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket="edgectl-artifacts")
    try:
        yield Site(moved, broker, moto_s3, postgres_url)
    finally:
        broker.kill()


def _secrets(site: Site) -> dict[str, dict[str, bytes]]:
    fleet = site.security_dir
    return {
        "edgectl-security": {name: (fleet / name).read_bytes()
                             for name in ("ca.crt", "ca.key", "token.key", "control-plane-credentials.json",
                                          "fleet-key.pem", "fleet-key.pub.pem")},
        "edgectl-db": {"url": site.state_url.encode()},
        "edgectl-s3": {"credentials": f"[default]\naws_access_key_id = {site.s3.access_key}\n"
                                      f"aws_secret_access_key = {site.s3.secret_key}\n".encode()},
    }  # fmt: skip


def _config_maps(site: Site, trust_pem: bytes) -> dict[str, dict[str, str]]:
    maps = {d["metadata"]["name"]: dict(d["data"]) for d in manifest_documents() if d["kind"] == "ConfigMap"}
    overrides = {
        "mqtt-url": f"mqtts://127.0.0.1:{site.broker.port}",
        "device-mqtt-url": f"mqtts://127.0.0.1:{site.broker.port}",
        "public-name": "127.0.0.1",
        "s3-endpoint": site.s3.url,
    }
    assert set(overrides) < set(maps["edgectl-control-plane"]), "the ConfigMap lost a site setting"
    maps["edgectl-control-plane"].update(overrides)
    maps["edgectl-trust"] = {"release.pub": trust_pem.decode()}
    return maps


def _pod_spec(kind: str) -> dict[str, Any]:
    doc = next(d for d in manifest_documents() if d["kind"] == kind)
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def test_manifest_migrates_then_starts_and_answers_its_probes(
    site: Site, tmp_path: Path, build: BuildFn, signing_key: Any
) -> None:
    from edgectl.artifact import public_pem

    secrets, config_maps = _secrets(site), _config_maps(site, public_pem(signing_key.public_key))

    # The Job: `control-plane migrate` migrates the empty database, then exits 0.
    job = materialize(_pod_spec("Job"), tmp_path / "job-root", config_maps, secrets)
    done = subprocess.run(job.argv, env=job.env, cwd=job.root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "postgresql state store at schema version" in done.stdout and "applied 1" in done.stdout
    assert site.state_url not in " ".join(job.argv), "the state URL (with its password) must stay out of argv"

    pod_spec = _pod_spec("Deployment")
    pod = materialize(pod_spec, tmp_path / "root", config_maps, secrets)
    (container,) = pod_spec["containers"]
    before = _snapshot(pod.root, pod.writable)
    log = (tmp_path / "cp.log").open("wb")
    process = subprocess.Popen(pod.argv, env=pod.env, cwd=pod.root, stdout=log, stderr=subprocess.STDOUT)
    try:
        probe_port = pod.ports[container["readinessProbe"]["grpc"]["port"]]
        assert container["livenessProbe"]["grpc"]["port"] == container["readinessProbe"]["grpc"]["port"]
        deadline, status = time.monotonic() + 60, -1
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = _health(probe_port, timeout=2)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                time.sleep(0.3)
        tail = (tmp_path / "cp.log").read_text(errors="replace")[-3000:]
        assert status == health_pb2.HealthCheckResponse.SERVING, f"exit {process.poll()}; log:\n{tail}"

        # Metrics are on, at the declared port.
        metrics_port = pod.ports[
            next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert b"edgectl_devices" in resp.read()

        # People: TLS from the Secret's CA (no replica minted its own) and a token from its token key.
        token = subprocess.run(
            [str(EDGECTL), "control-plane", "token", "--security-dir", str(site.security_dir),
             "--role", "deployer", "--subject", "ci"], capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        ca_pem = secrets["edgectl-security"]["ca.crt"]
        api = pod.ports[next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")]
        artifact: Artifact = build(size=300_000)
        with ControlPlaneClient(
            f"127.0.0.1:{api}", 20, ClientCredentials(token=token, ca_pem=ca_pem)
        ) as client:
            client.fleet.ListDevices(fleet_pb2.ListDevicesRequest(), timeout=10)
            push_artifact(client, artifact.root)  # trusted through the mounted ConfigMap
        # The bytes went to the bucket, with the credentials file the Secret mounted.
        listed = site.s3.client().list_objects_v2(Bucket="edgectl-artifacts", Prefix="blobs/sha256/")  # type: ignore[attr-defined]
        assert listed.get("KeyCount", 0) > 0

        # The web console answers over HTTPS with the same certificate, and wants a token.
        console = pod.ports[next(p["containerPort"] for p in container["ports"] if p["name"] == "console")]
        tls = ssl.create_default_context(cadata=ca_pem.decode())
        with urllib.request.urlopen(f"https://127.0.0.1:{console}/login", timeout=10, context=tls) as resp:
            assert resp.status == 200 and b'id="token"' in resp.read()

        # Agents' listener is up; the broker took the Secret's credentials (anonymous is off there).
        devices = pod.ports[next(p["containerPort"] for p in container["ports"] if p["name"] == "devices")]
        assert wait_for_port("127.0.0.1", devices, 5)
        deadline = time.monotonic() + 20
        while "MQTT connected" not in (tmp_path / "cp.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "MQTT connected" in (tmp_path / "cp.log").read_text()
        assert (
            site.state_url not in " ".join(pod.argv)
            and site.state_url not in (tmp_path / "cp.log").read_text()
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            rc = process.wait(pod_spec["terminationGracePeriodSeconds"])
        except subprocess.TimeoutExpired:
            process.kill()
            rc = -9
        log.close()
    assert rc == 0, f"SIGTERM should stop the replica cleanly within the grace period (exit {rc})"
    # A read-only root filesystem: nothing outside the writable mounts was written (no CA minted).
    assert _snapshot(pod.root, pod.writable) == before


def test_materialize_refuses_a_secret_key_the_manifest_does_not_get(tmp_path: Path) -> None:
    """Positive control for the harness: a Secret missing a key the manifest mounts is an error."""
    pod_spec = _pod_spec("Deployment")
    secrets: dict[str, dict[str, bytes]] = {
        "edgectl-security": {"ca.crt": b"x"},
        "edgectl-s3": {},
        "edgectl-db": {},
    }
    with pytest.raises(AssertionError, match=r"ca\.key"):
        materialize(pod_spec, tmp_path, {"edgectl-trust": {}, "edgectl-control-plane": {}}, secrets)
