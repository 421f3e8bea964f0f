"""The console's HTTP server: static pages, a JSON view API and a server-sent-events stream.

aiohttp runs on an event loop of its own in one thread; views read the store in that loop's
default executor, so a slow query never blocks another browser. Every request but the login page
and its static files needs a viewer token, carried in an HttpOnly, SameSite=Strict cookie that a
POST to ``/api/login`` sets. Every response carries a strict Content-Security-Policy: scripts
only from this origin, none inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from edgectl.control_plane.console.views import LatencyHistory, Sources, render
from edgectl.control_plane.errors import NotFound
from edgectl.security.errors import TokenError
from edgectl.security.pki import IssuedCert
from edgectl.security.tokens import Claims, Role, TokenVerifier

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
COOKIE = "edgectl_console"
STREAM_INTERVAL_S = 1.0
MAX_STREAMS = 64  # open event streams; more are refused (503) rather than queued
MAX_BODY = 16 * 1024  # a login posts one token
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
_FILES = {"app.js": "text/javascript", "login.js": "text/javascript", "app.css": "text/css"}


@dataclass(frozen=True)
class Viewer:
    """Who looks at the console: a token's subject and role (anonymous admin when auth is off)."""

    subject: str
    role: Role


def tls_context(cert: IssuedCert) -> ssl.SSLContext:
    """A server TLS context from in-memory PEMs (ssl only loads files: a private temp dir, removed at once)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="edgectl-console-") as tmp:
        cert_file, key_file = Path(tmp) / "server.crt", Path(tmp) / "server.key"
        cert_file.write_bytes(cert.cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(cert.key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


@web.middleware
async def _headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    if isinstance(response, web.HTTPException):
        raise response
    return response


class ConsoleServer:
    """Serves the console on HOST:PORT until :meth:`stop`; ``verifier=None`` means auth is off (dev mode)."""

    def __init__(
        self,
        sources: Sources,
        verifier: TokenVerifier | None,
        token_revoked: Callable[[Claims], bool] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sources = sources
        self.verifier = verifier
        self.token_revoked = token_revoked or (lambda claims: False)
        self.tls = tls
        self.history = LatencyHistory()
        self.port = 0
        self._streams = 0
        self._cache: dict[tuple[str, bool], tuple[float, str]] = {}
        self._locks: dict[tuple[str, bool], asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    # -- authentication -------------------------------------------------------------------

    def viewer_of(self, token: str) -> Viewer | None:
        """The viewer a token proves (viewer role or more), or None."""
        if self.verifier is None:
            return Viewer("anonymous", Role.ADMIN)
        try:
            claims = self.verifier.verify(token)
        except TokenError:
            return None
        if claims.role < Role.VIEWER or self.token_revoked(claims):
            return None
        return Viewer(claims.subject, claims.role)

    async def _viewer(self, request: web.Request) -> Viewer | None:
        # The revocation check reads the store: off the event loop, like every other read.
        token = request.cookies.get(COOKIE, "")
        return await asyncio.get_running_loop().run_in_executor(None, self.viewer_of, token)

    async def _login(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return web.json_response({"error": "request too large"}, status=413)
        if request.content_type != "application/json":  # another site's form cannot send this type
            return web.json_response({"error": "post JSON (Content-Type: application/json)"}, status=415)
        try:
            body = await request.json()
            token = str(body["token"]).strip()
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'post {"token": "edgectl...."}'}, status=400)
        viewer = await asyncio.get_running_loop().run_in_executor(None, self.viewer_of, token)
        if viewer is None:
            return web.json_response(
                {"error": "token refused: invalid, expired, revoked or below viewer"}, status=401
            )
        response = web.json_response({"subject": viewer.subject, "role": viewer.role.name.lower()})
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="Strict", secure=self.tls is not None, path="/"
        )
        await asyncio.get_running_loop().run_in_executor(None, self._audit, viewer, str(request.remote or ""))
        return response

    def _audit(self, viewer: Viewer, peer: str) -> None:
        try:
            self.sources.audit.record(viewer.subject, peer, "console/Login", "", "{}", "OK")
        except Exception:  # the console keeps working when the audit write fails; the log says so
            log.exception("cannot audit a console login")

    async def _logout(self, request: web.Request) -> web.Response:
        response = web.json_response({})
        response.del_cookie(COOKIE, path="/")
        return response

    # -- pages ----------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        if await self._viewer(request) is None:
            raise web.HTTPSeeOther("/login")
        return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "login.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _FILES:  # a fixed list: no path ever reaches the file system from a URL
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Content-Type": f"{_FILES[name]}; charset=utf-8"})

    async def _whoami(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        if viewer is None:
            return web.json_response({"error": "log in with a token"}, status=401)
        return web.json_response({"subject": viewer.subject, "role": viewer.role.name.lower(),
                                  "auth": self.verifier is not None})  # fmt: skip

    async def _compute(self, page: str, viewer: Viewer) -> dict[str, Any]:
        admin = viewer.role >= Role.ADMIN
        return await asyncio.get_running_loop().run_in_executor(
            None, render, self.sources, self.history, page, admin
        )

    async def _shared(self, page: str, viewer: Viewer) -> str:
        """The page as JSON, computed at most once per interval for every stream watching it:
        a hundred open consoles cost one store read a second, not a hundred."""
        key = (page, viewer.role >= Role.ADMIN)
        if len(self._locks) > 4 * MAX_STREAMS:  # device pages are many: forget idle ones
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            at, data = self._cache.get(key, (0.0, ""))
            if time.monotonic() - at >= STREAM_INTERVAL_S * 0.9:
                data = json.dumps(await self._compute(page, viewer), sort_keys=True)
                if len(self._cache) > 4 * MAX_STREAMS:  # device pages are many: keep the cache small
                    self._cache.clear()
                self._cache[key] = (time.monotonic(), data)
            return data

    async def _view(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        if viewer is None:
            return web.json_response({"error": "log in with a token"}, status=401)
        try:
            return web.json_response(await self._compute(request.query.get("page", "overview"), viewer))
        except (KeyError, NotFound) as exc:
            return web.json_response({"error": f"no such page: {exc}"}, status=404)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        viewer = await self._viewer(request)
        if viewer is None:
            return web.json_response({"error": "log in with a token"}, status=401)
        if self._streams >= MAX_STREAMS:
            return web.json_response({"error": "too many open consoles; try again later"}, status=503)
        page = request.query.get("page", "overview")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        self._streams += 1
        last = ""
        try:
            while self._stopping is not None and not self._stopping.is_set():
                if await self._viewer(request) is None:  # expired or revoked while watching
                    await response.write(b"event: auth\ndata: {}\n\n")
                    break
                try:
                    data = await self._shared(page, viewer)
                except (KeyError, NotFound) as exc:
                    data = json.dumps({"error": f"no such page: {exc}"})
                if data != last:
                    await response.write(f"data: {data}\n\n".encode())
                    last = data
                else:
                    await response.write(b": keep-alive\n\n")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), STREAM_INTERVAL_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the browser went away
        finally:
            self._streams -= 1
        return response

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (routes and the security headers)."""
        app = web.Application(middlewares=[_headers], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_get("/login", self._login_page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_post("/api/login", self._login)
        app.router.add_post("/api/logout", self._logout)
        app.router.add_get("/api/whoami", self._whoami)
        app.router.add_get("/api/view", self._view)
        app.router.add_get("/api/stream", self._stream)
        return app

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port) in a thread of its own; returns the port."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._stopping = asyncio.Event()
                self._runner = web.AppRunner(self.app(), access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, host, port, ssl_context=self.tls)
                loop.run_until_complete(site.start())
                self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_until_complete(self._stopping.wait())
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="console", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        """Close every stream and stop listening."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
