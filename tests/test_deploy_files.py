"""The deployment files are checked as the tools that run them would: the Kubernetes manifest
against the API schema (offline) and checkov's policies, the systemd unit by `systemd-analyze
verify`. tests/control_plane/test_cp_deploy_manifest.py starts what the manifest describes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "docs" / "deploy" / "control-plane.k8s.yaml"
UNIT = ROOT / "docs" / "deploy" / "edgectl-agent.service"
# The oldest Kubernetes the manifest promises to run on (grpc probes are GA from 1.27).
K8S_VERSION = "1.27.0"
INSTALLED_UNIT_BINARY = "/opt/edgectl/bin/edgectl"


def manifest_documents() -> list[dict[str, Any]]:
    """Every object in the manifest, in file order."""
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any outbound connection fail, so an 'offline' check that goes online fails loudly."""

    def refuse(self: socket.socket, address: object) -> None:
        raise AssertionError(f"the schema check tried to reach {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_manifest_matches_the_kubernetes_schema_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)")
    _no_network(monkeypatch)
    docs = manifest_documents()
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "Job", "PodDisruptionBudget", "Service", "ConfigMap"} <= set(kinds), kinds
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)  # strict: an unknown (misspelt) field is an error
    # Positive control: the same validator refuses a misspelt probe and a wrongly typed field.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 7445}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def _checkov() -> str:
    """checkov from PATH or .venv-checkov, which `make check-deploy` makes (its pins clash with the dev extra)."""
    for candidate in (shutil.which("checkov"), ROOT / ".venv-checkov" / "bin" / "checkov"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    message = "checkov is not installed: run `make check-deploy` (it keeps checkov in .venv-checkov)"
    if os.environ.get("EDGECTL_REQUIRE_CHECKOV"):
        pytest.fail(message)
    pytest.skip(message)


def _run_checkov(path: Path) -> dict[str, Any]:
    # --skip-download: no policy metadata from the vendor's API; unshare -n (when allowed) proves it.
    cmd = [
        _checkov(),
        "-f",
        str(path),
        "--framework",
        "kubernetes",
        "--skip-download",
        "--quiet",
        "-o",
        "json",
    ]
    if (
        shutil.which("unshare")
        and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    ):
        cmd = ["unshare", "-rn", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip(), f"checkov printed nothing (exit {done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(done.stdout)
    return report[0] if isinstance(report, list) else report  # type: ignore[no-any-return]


def test_manifest_passes_checkov_with_every_skip_explained(tmp_path: Path) -> None:
    report = _run_checkov(MANIFEST)
    failed = report["results"]["failed_checks"]
    assert not failed, [f"{c['check_id']} {c['check_name']} on {c['resource']}" for c in failed]
    assert report["summary"]["passed"] > 100 and report["summary"]["parsing_errors"] == 0
    for doc in manifest_documents():
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert len(reason.split()) >= 6, f"skip of {check} in {doc['kind']} needs a written reason"
    # Positive control: a root container with a writable root filesystem fails the same run.
    docs = manifest_documents()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pod["securityContext"] = {}
    pod["containers"][0]["securityContext"] = {"readOnlyRootFilesystem": False}
    bad = tmp_path / "bad.k8s.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    ids = {c["check_id"] for c in _run_checkov(bad)["results"]["failed_checks"]}
    assert {"CKV_K8S_22", "CKV_K8S_23"} <= ids, ids


def _verify_unit(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit, its install path mapped to this checkout's edgectl."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); it checks the agent's unit")
    edgectl = Path(sys.executable).parent / "edgectl"
    assert text.count(INSTALLED_UNIT_BINARY) == 1, "the unit's ExecStart moved: update INSTALLED_UNIT_BINARY"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_UNIT_BINARY, str(edgectl)))
    return subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120
    )


def test_agent_unit_verifies_and_allows_the_gpu_device_nodes(tmp_path: Path) -> None:
    text = UNIT.read_text()
    done = _verify_unit(tmp_path, text)
    if "Failed to connect to bus" in done.stderr or "Failed to initialize manager" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()[:300]}")
    # verify exits 0 on a directive it ignores, so any complaint at all fails the test.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stderr
    allowed = {
        line.split("=", 1)[1].split()[0] for line in text.splitlines() if line.startswith("DeviceAllow=")
    }
    cuda = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0"}
    jetson = {"/dev/nvmap", "char-nvhost-*"}
    assert cuda <= allowed and jetson <= allowed, sorted(cuda | jetson - allowed)
    # Positive control: a misspelt directive value is reported.
    broken = _verify_unit(tmp_path, text.replace("Type=simple", "Type=simpel"))
    assert "simpel" in broken.stderr
