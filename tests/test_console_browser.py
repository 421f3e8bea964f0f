"""The web console in a real headless Chromium, against a real `edgectl up` fleet during a rollout.

Promises: no token gets the login page; a viewer token sees the fleet; the wave progresses and
device versions change on the page without a reload; a hostile device's label and error render as
text (no dialog fires, no element is made from them). Screenshots go to docs/img/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgectl.artifact import SigningKey
from edgectl.client import ControlPlaneClient, push_artifact, resolve_credentials
from edgectl.control_plane.security import TOKEN_KEY_FILE
from edgectl.endpoints import Endpoints
from edgectl.mqtt.wire import DeviceTopics, encode
from edgectl.protos.inference import grpc_predict_v2_pb2 as v2
from edgectl.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from edgectl.protos.v1 import mqtt_pb2
from edgectl.security.tokens import Role, TokenIssuer
from tests.agent.onnx_models import mlp_artifact
from tests.harness.upfleet import enroll_rogue, start_rollout, up_fleet

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
HOSTILE_LABEL = "<img src=x onerror=alert(1)>"
HOSTILE_ERROR = "<script>alert(2)</script><svg onload=alert(3)>"
# Screenshots land in the test's temp dir; EDGECTL_CONSOLE_SHOTS=1 writes docs/img/ (what the docs show).
DOC_SHOTS = Path(__file__).resolve().parents[1] / "docs" / "img"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, SigningKey]]:
    """A secured `edgectl up` fleet with two edge agents; skipped without chromium or playwright."""
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is missing: `make setup` installs it (as root), or apt-get install chromium"
        )
    pytest.importorskip("playwright.sync_api", reason="playwright is missing: `make setup` installs it")
    with up_fleet(tmp_path, heartbeat_s=2) as got:
        yield got


def _hostile_device(client: ControlPlaneClient, endpoints: Endpoints) -> None:
    """A compromised device enrolls legitimately, then reports script in its label and error."""
    mqtt = enroll_rogue(client, endpoints, "evil-1")
    state = mqtt_pb2.ReportedState(device_id="evil-1", labels={"note": HOSTILE_LABEL}, last_error=HOSTILE_ERROR,
                                   agent_version=HOSTILE_LABEL)  # fmt: skip
    topics = DeviceTopics("evil-1")
    mqtt.publish(topics.status, encode(mqtt_pb2.DeviceStatus(device_id="evil-1", online=True)), retain=True)
    mqtt.publish(topics.reported, encode(state), retain=True)
    mqtt.close()


def _traffic(addresses: list[str], seconds: float) -> None:
    """Real KServe V2 requests to the agents, so their reports carry latency for the sparklines."""
    stubs = [v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(a)) for a in addresses]
    rng = np.random.default_rng(1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for stub in stubs:
            rows = int(rng.integers(1, 64))
            x = rng.standard_normal((rows, 4)).astype(np.float32)
            request = v2.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()], inputs=[
                v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[rows, 4])])  # fmt: skip
            stub.ModelInfer(request, timeout=10)
        time.sleep(float(rng.uniform(0.0, 0.05)))


def _snapshot(page: Any) -> dict[str, Any]:
    return page.evaluate(  # type: ignore[no-any-return]
        """() => ({
          waves: [...document.querySelectorAll('[data-testid^="wave-"]')].map(w =>
            [w.dataset.testid, w.dataset.state, Number(w.dataset.healthy), Number(w.dataset.size)]),
          versions: Object.fromEntries([...document.querySelectorAll('[data-testid^="versions-"]')].map(v =>
            [v.dataset.testid.slice(9), v.textContent])),
          marker: window.__noReload === 1,
        })"""
    )


def test_console_shows_a_rollout_live_to_a_viewer_and_renders_hostile_strings_as_text(
    fleet: tuple[Path, SigningKey], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    data, key = fleet
    shots = DOC_SHOTS if os.environ.get("EDGECTL_CONSOLE_SHOTS") == "1" else tmp_path
    endpoints = Endpoints.read(data)
    assert endpoints.console and endpoints.console.startswith("https://")
    viewer = TokenIssuer.load_or_create(data / "security" / TOKEN_KEY_FILE).issue("vic", Role.VIEWER)
    art = mlp_artifact(tmp_path / "art", tmp_path / "models", key, version=1)
    with ControlPlaneClient(
        endpoints.control_plane, credentials=resolve_credentials(data_dir=data)
    ) as client:
        _hostile_device(client, endpoints)
        digest = push_artifact(client, art.root).artifact.ref.digest
        dialogs: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            # no token: the login page
            page.goto(endpoints.console)
            page.wait_for_url("**/login")
            page.screenshot(path=str(shots / "console-login.png"))
            page.fill("#token", "edgectl.not.a-token")
            page.click("button[type=submit]")
            page.wait_for_selector("[data-testid=login-error]:has-text('refused')")
            # a viewer token is enough
            page.fill("#token", viewer)
            page.click("button[type=submit]")
            page.wait_for_url(endpoints.console)
            page.wait_for_selector("[data-testid=versions-edge-2]", timeout=30_000)
            page.wait_for_selector("[data-testid=device-evil-1]", timeout=30_000)
            assert "vic (viewer)" in page.inner_text("[data-testid=who]")
            page.evaluate("() => { window.__noReload = 1; }")
            # the rollout starts after the page loaded: only live updates can show it
            rid = start_rollout(client, digest, {"tier": "edge"}, soak_s=4)
            seen: list[dict[str, Any]] = []
            deadline = time.monotonic() + 150
            shot = False
            while time.monotonic() < deadline:
                snap = _snapshot(page)
                seen.append(snap)
                waves = {w[0]: w for w in snap["waves"] if w[0].startswith(f"wave-{rid}-")}
                if waves and not shot:
                    page.screenshot(path=str(shots / "console-rollout.png"), full_page=True)
                    shot = True
                if all("mlp:v1" in snap["versions"].get(d, "") for d in ("edge-1", "edge-2")):
                    break
                time.sleep(0.25)
            final = seen[-1]
            assert final["marker"], "the page reloaded"
            assert all("mlp:v1" in final["versions"][d] for d in ("edge-1", "edge-2")), final
            # versions changed one wave at a time: edge-1 (wave 1) moved while edge-2 had not yet
            moved = [tuple("mlp:v1" in s["versions"].get(d, "") for d in ("edge-1", "edge-2")) for s in seen]
            assert moved[0] == (False, False) and (True, False) in moved, moved
            # the first wave's bar progressed on the page: in progress with 0 healthy, then 1 of 1
            first = [tuple(w[1:3]) for s in seen for w in s["waves"] if w[0] == f"wave-{rid}-0"]
            assert ("in_progress", 0) in first and first.index(("in_progress", 0)) < len(first) - 1, first
            assert any(h == 1 for _s, h in first), first
            # ... and the rollouts page shows it succeed, with who started it
            page.click("[data-testid=nav-rollouts]")
            page.wait_for_selector(f"[data-testid=wave-{rid}-1][data-state=succeeded]", timeout=60_000)
            assert "edgectl-up" in page.inner_text(f"[data-testid=rollout-{rid}]")
            page.screenshot(path=str(shots / "console-rollouts.png"), full_page=True)
            # the artifact with its size, lineage and the key that signed it
            page.click("[data-testid=nav-artifacts]")
            page.wait_for_selector("[data-testid=artifacts] >> text=mlp:v1")
            row = page.inner_text("[data-testid=artifacts]")
            assert digest[:19] in row and key.key_id in row and "KiB" in row
            page.screenshot(path=str(shots / "console-artifacts.png"), full_page=True)
            # traffic: the devices' next reports carry p99 and the sparklines draw it, live
            _traffic([a.v2 for a in endpoints.agents], 8.0)
            page.click("[data-testid=nav-overview]")
            page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=device-edge-1] svg.spark polyline')].length === 1"
                " && document.querySelector('[data-testid=p99-edge-1]').textContent !== '0.00'",
                timeout=30_000,
            )
            page.screenshot(path=str(shots / "console-overview.png"), full_page=True)
            # hostile strings are text: shown verbatim, no element made from them, no dialog
            assert HOSTILE_LABEL in page.inner_text("[data-testid=device-evil-1]")
            # every device row draws its latency sparkline (inline SVG made with DOM APIs)
            assert page.locator("[data-testid^=device-] svg.spark").count() == 4
            page.goto(f"{endpoints.console}#/device/evil-1")
            page.wait_for_selector("[data-testid=last-error]")
            assert page.inner_text("[data-testid=last-error]") == HOSTILE_ERROR
            assert page.locator("#app img, #app script, #app svg[onload]").count() == 0
            page.screenshot(path=str(shots / "console-device.png"), full_page=True)
            page.goto(f"{endpoints.console}#/device/edge-1")
            page.wait_for_function(
                "() => document.querySelector('[data-testid=models]')?.textContent.includes('mlp')"
            )
            page.wait_for_timeout(1000)
            assert dialogs == []
            # logging out ends the session: back to the login page
            page.click("#logout")
            page.wait_for_url("**/login")
            page.goto(endpoints.console)
            page.wait_for_url("**/login")
            browser.close()
