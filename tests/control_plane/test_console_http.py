"""The console's HTTP surface, without a browser: who gets in, what every response carries, and what
the views say. A real ConsoleServer over a real SQLite store and real tokens, on a free port."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgectl.artifact import TrustStore, open_blob_store
from edgectl.control_plane.artifacts import ArtifactStore
from edgectl.control_plane.audit import AuditLog
from edgectl.control_plane.console import ConsoleServer, Sources
from edgectl.control_plane.console.server import COOKIE, STATIC
from edgectl.control_plane.device_state import Reported, Status
from edgectl.control_plane.fleet import Fleet
from edgectl.control_plane.rollouts import Rollouts
from edgectl.control_plane.store import StateStore
from edgectl.protos.v1 import mqtt_pb2
from edgectl.security.tokens import Claims, Role, TokenIssuer

HOSTILE = "<img src=x onerror=alert(1)>"


@dataclass
class Console:
    url: str
    issuer: TokenIssuer
    revoked: set[str]
    audit: AuditLog


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    fleet = Fleet(store)
    now = time.time()
    state = mqtt_pb2.ReportedState(device_id="cam-1", labels={"note": HOSTILE}, last_error="</script><b>x</b>",
                                   models=[mqtt_pb2.ActiveModel(name="det", digest="sha256:" + "a" * 64, version=3,
                                                                drift_score=0.31, drift_requests=1000)],
                                   stats=mqtt_pb2.ServingStats(requests=10, p99_ms=12.5, window_seconds=60))  # fmt: skip
    fleet.apply([Reported("cam-1", state, now), Status("cam-1", True, now)])
    artifacts = ArtifactStore(store, open_blob_store(str(tmp_path / "blobs")), TrustStore())
    audit = AuditLog(store)
    issuer = TokenIssuer.load_or_create(tmp_path / "token.key")
    revoked: set[str] = set()

    def is_revoked(claims: Claims) -> bool:
        return claims.token_id in revoked

    server = ConsoleServer(Sources(fleet, Rollouts(store, artifacts, fleet), artifacts, audit), issuer.verifier(),
                           is_revoked)  # fmt: skip
    port = server.start("127.0.0.1", 0)
    try:
        yield Console(f"http://127.0.0.1:{port}", issuer, revoked, audit)
    finally:
        server.stop()
        store.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def call(
    url: str,
    cookie: str = "",
    body: object = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    if cookie:
        req.add_header("Cookie", f"{COOKIE}={cookie}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_no_token_gets_the_login_page_and_every_response_has_a_strict_csp(console: Console) -> None:
    status, headers, _ = call(console.url + "/")
    assert status == 303 and headers["Location"] == "/login"
    for path in ("/", "/login", "/static/app.js", "/api/view?page=overview"):
        _s, headers, _ = call(console.url + path)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert call(console.url + "/api/view?page=overview")[0] == 401
    assert call(console.url + "/api/stream?page=overview")[0] == 401
    status, _h, page = call(console.url + "/login")
    assert status == 200 and b'id="token"' in page


def test_login_takes_a_viewer_token_and_refuses_bad_expired_and_revoked_ones(console: Console) -> None:
    assert call(console.url + "/api/login", body={"token": "edgectl.bad.token"})[0] == 401
    expired = console.issuer.issue("old", Role.VIEWER, ttl_s=1, now=time.time() - 100)
    assert call(console.url + "/api/login", body={"token": expired})[0] == 401
    assert call(console.url + "/api/login", raw=b"x" * 40_000)[0] == 413
    token = console.issuer.issue("vic", Role.VIEWER)
    # another site's form (text/plain, no preflight) cannot log a browser in, even with a good token
    assert call(console.url + "/api/login", body={"token": token}, content_type="text/plain")[0] == 415
    status, headers, body = call(console.url + "/api/login", body={"token": token})
    assert status == 200 and json.loads(body) == {"subject": "vic", "role": "viewer"}
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in body.decode()
    assert call(console.url + "/", cookie=token)[0] == 200
    assert any(e.identity == "vic" and e.action == "console/Login" for e in console.audit.entries())
    # revoked while logged in: the next read is refused
    console.revoked.add(console.issuer.verifier().verify(token).token_id)
    assert call(console.url + "/api/view?page=overview", cookie=token)[0] == 401


def test_views_carry_device_strings_as_data_and_the_audit_trail_only_to_admins(console: Console) -> None:
    viewer = console.issuer.issue("vic", Role.VIEWER)
    status, headers, body = call(console.url + "/api/view?page=overview", cookie=viewer)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    view = json.loads(body)
    [device] = view["devices"]
    assert device["labels"] == {"note": HOSTILE} and device["versions"] == ["det:v3"] and device["online"]
    assert view["matrix"] == {
        "columns": ["det:v3"], "rows": [{"label": f"note={HOSTILE}", "counts": [1]}], "rows_left_out": 0
    }  # fmt: skip
    page = json.loads(call(console.url + "/api/view?page=device/cam-1", cookie=viewer)[2])
    assert page["p99_ms"] == 12.5 and page["models"][0]["drift"] == 0.31  # the device's input drift
    assert call(console.url + "/api/view?page=device/nope", cookie=viewer)[0] == 404
    assert call(console.url + "/api/view?page=secrets", cookie=viewer)[0] == 404
    assert json.loads(call(console.url + "/api/view?page=rollouts", cookie=viewer)[2])["audit"] is None
    admin = console.issuer.issue("ada", Role.ADMIN)
    assert json.loads(call(console.url + "/api/view?page=rollouts", cookie=admin)[2])["audit"] == []
    # the stream sends the same view as a server-sent event
    req = urllib.request.Request(
        console.url + "/api/stream?page=overview", headers={"Cookie": f"{COOKIE}={viewer}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = resp.readline().decode()
    assert first.startswith("data: ") and json.loads(first[6:])["total"] == 1


def test_static_files_are_a_fixed_list_and_never_build_html_from_data(console: Console) -> None:
    assert call(console.url + "/static/app.js")[0] == 200
    for path in ("/static/server.py", "/static/..%2fserver.py", "/static/index.html"):
        assert call(console.url + path)[0] == 404, path
    for name in ("app.js", "login.js"):
        source = (STATIC / name).read_text()
        assert "innerHTML" not in source and "outerHTML" not in source and "insertAdjacentHTML" not in source
        assert "eval(" not in source and "document.write" not in source
    for name in ("index.html", "login.html"):
        html = (STATIC / name).read_text()
        assert html.count("<script") == html.count('<script src="/static/'), name  # no inline script


def test_insecure_mode_shows_the_console_without_login_as_the_api_does(tmp_path: Path) -> None:
    """With auth off (a development box, `--insecure`), everyone is the anonymous admin, as for the API."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    fleet = Fleet(store)
    artifacts = ArtifactStore(store, open_blob_store(str(tmp_path / "blobs")), TrustStore())
    server = ConsoleServer(
        Sources(fleet, Rollouts(store, artifacts, fleet), artifacts, AuditLog(store)), None
    )
    url = f"http://127.0.0.1:{server.start('127.0.0.1', 0)}"
    try:
        assert call(url + "/")[0] == 200
        assert json.loads(call(url + "/api/whoami")[2]) == {
            "subject": "anonymous",
            "role": "admin",
            "auth": False,
        }
        assert json.loads(call(url + "/api/view?page=overview")[2])["total"] == 0
    finally:
        server.stop()
        store.close()


def test_the_matrix_keeps_the_most_common_labels_when_devices_carry_unique_ones(tmp_path: Path) -> None:
    from edgectl.control_plane.console.views import MAX_MATRIX_ROWS, LatencyHistory, overview

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        fleet = Fleet(store)
        now = time.time()
        fleet.apply([Reported(f"d{i}", mqtt_pb2.ReportedState(device_id=f"d{i}", labels={"site": "a", "serial": str(i)}),
                              now) for i in range(MAX_MATRIX_ROWS + 10)])  # fmt: skip
        artifacts = ArtifactStore(store, open_blob_store(str(tmp_path / "blobs")), TrustStore())
        view = overview(fleet, Rollouts(store, artifacts, fleet), LatencyHistory())
    finally:
        store.close()
    rows = view["matrix"]["rows"]
    assert len(rows) == MAX_MATRIX_ROWS and view["matrix"]["rows_left_out"] == 11
    assert {"label": "site=a", "counts": [MAX_MATRIX_ROWS + 10]} in rows
