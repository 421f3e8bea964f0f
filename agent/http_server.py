"""The KServe V2 protocol over HTTP/REST (Triton's port 8000 API) beside the gRPC server.

An aiohttp application on its own event-loop thread, sharing the registry, router (so the
batcher, burst and metrics) with gRPC. Requests are parsed and checked against the model's
signature on the loop; decoding and the model run happen on a worker thread, so a slow model
never blocks health checks. Agent errors map to HTTP statuses in one place (``_status``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

import edgectl
from edgectl.addresses import HostPort, parse_host_port
from edgectl.agent.codecs import decode_response, encode_request
from edgectl.agent.errors import (
    AgentError,
    BudgetExhaustedError,
    BurstUnavailableError,
    ConfigError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    NotServedError,
)
from edgectl.agent.http_codec import HEADER_LENGTH, HttpRequest, decode_inputs, encode_response, parse_request
from edgectl.agent.router import SERVED_BY, InferCall, InferenceRouter, InferResult
from edgectl.agent.serving import ModelRegistry
from edgectl.agent.v2_triton import (
    EXTENSIONS,
    message_to_triton_dict,
    model_config,
    model_metadata,
    model_statistics,
    not_served,
    repository_index,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: list[tuple[type[AgentError], int]] = [
    (InvalidInputError, 400),
    (ModelNotFoundError, 404),
    (ModelUnavailableError, 503),
    (BurstUnavailableError, 503),
    (BudgetExhaustedError, 429),
    (NotServedError, 501),
]
# Triton's REST paths of the extensions not served here (every method), and which extension each is.
_NOT_SERVED_PATHS = {
    "/v2/repository/models/{model}/{action:load|unload}": "model_repository",
    "/v2/systemsharedmemory{rest:(/.*)?}": "system_shared_memory",
    "/v2/cudasharedmemory{rest:(/.*)?}": "cuda_shared_memory",
    "/v2/trace/setting": "trace",
    "/v2/models/{model}/trace/setting": "trace",
    "/v2/logging": "logging",
}


def _status(exc: AgentError) -> int:
    return next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AgentError as exc:
        return _error(_status(exc), str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (unknown path 404, wrong method 405, body too large 413) with the
        # V2 error body: Triton's clients parse every error body as JSON.
        default = f"{exc.status}: {exc.reason}"
        message = (
            exc.text if exc.text and exc.text != default else f"{exc.reason}: {request.method} {request.path}"
        )
        response = _error(exc.status, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:  # a bug, not the caller's fault: a V2 error body, and the trace in the log
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


class HttpV2Server:
    """Serves V2 over HTTP on ``listen``; ``address`` is HOST:PORT once ``start`` returns."""

    def __init__(
        self,
        registry: ModelRegistry,
        router: InferenceRouter,
        listen: str,
        *,
        ready: Callable[[], bool] | None = None,
        middlewares: tuple[Any, ...] = (),
        ssl_context: Any = None,
        max_workers: int = 64,
    ) -> None:
        self.registry = registry
        self.router = router
        self._ready = ready
        bind = parse_host_port(listen, what="--http-listen", listen=True)
        self._host, self._port = bind.host, bind.port
        self._ssl = ssl_context
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="v2-http")
        self.app = web.Application(
            client_max_size=router.limits.max_request_bytes, middlewares=[*middlewares, _errors]
        )
        self._routes()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.address = listen

    def _routes(self) -> None:
        r = self.app.router
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._server_ready)
        r.add_get("/v2", self._server_metadata)
        r.add_post("/v2/repository/index", self._index)
        r.add_get("/v2/models/stats", self._stats)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self._metadata)
            r.add_get(base + "/ready", self._model_ready)
            r.add_get(base + "/config", self._config)
            r.add_get(base + "/stats", self._stats)
            r.add_post(base + "/infer", self._infer)
        for path, extension in _NOT_SERVED_PATHS.items():
            r.add_route("*", path, self._not_served(extension))

    def is_ready(self) -> bool:
        """Ready to serve: a model is loaded (or what the agent says)."""
        return self._ready() if self._ready is not None else bool(self.registry.names())

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _server_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.is_ready() else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "edgectl-agent", "version": edgectl.__version__, "extensions": list(EXTENSIONS)}
        )

    @staticmethod
    def _not_served(extension: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            raise not_served(extension)

        return handler

    def _served(self, request: web.Request) -> Any:
        return self.registry.require(request.match_info["model"], request.match_info.get("version", ""))

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_to_triton_dict(model_metadata(self.registry, self._served(request))))

    async def _model_ready(self, request: web.Request) -> web.Response:
        found = self.registry.resolve(request.match_info["model"], request.match_info.get("version", ""))
        return web.Response(status=200 if found is not None else 400)

    async def _config(self, request: web.Request) -> web.Response:
        return web.json_response(
            message_to_triton_dict(model_config(self._served(request), self.registry.settings))
        )

    async def _stats(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model", "")
        version = request.match_info.get("version", "")
        if name:
            self.registry.require(name, version)
        return web.json_response(message_to_triton_dict(model_statistics(self.registry, name, version)))

    async def _index(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            doc = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise InvalidInputError(f"request JSON does not parse: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidInputError("repository index request must be a JSON object")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError(f"'ready' must be true or false, got {ready!r}")
        return web.json_response(message_to_triton_dict(repository_index(self.registry, ready))["models"])

    async def _infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version", "")
        if self.router.burst is None:
            self.registry.require(name, version)  # 404 before reading a body nobody will use
        body = await request.read()
        parsed = parse_request(body, request.headers.get(HEADER_LENGTH), self.router.limits)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._pool, self._run, name, version, parsed)
        return self._respond(result, parsed)

    def _run(self, name: str, version: str, parsed: HttpRequest) -> InferResult:
        def to_proto() -> Any:
            req = encode_request(
                name, decode_inputs(parsed), request_id=parsed.request_id, outputs=parsed.outputs
            )
            req.model_version = version
            return req

        call = InferCall(
            model=name,
            version=version,
            request_id=parsed.request_id,
            outputs=parsed.outputs,
            headers=lambda: [i.header for i in parsed.inputs],
            decode=lambda: decode_inputs(parsed),
            to_proto=to_proto,
            nbytes=lambda: len(parsed.body),
        )
        return self.router.infer(call)

    def _respond(self, result: InferResult, parsed: HttpRequest) -> web.Response:
        start = time.perf_counter()
        outputs = result.outputs if result.outputs is not None else {}
        if result.response is not None:
            outputs = decode_response(result.response)
            if parsed.outputs:
                outputs = {n: outputs[n] for n in parsed.outputs if n in outputs}
        binary = set(outputs) if parsed.binary_default else parsed.binary_outputs
        body, hlen = encode_response(
            result.model,
            result.version,
            result.request_id,
            outputs,
            frozenset(binary),
            {SERVED_BY: result.served_by},
        )
        if result.served is not None:
            result.served.stats.output(int((time.perf_counter() - start) * 1e9))
        if hlen is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(
            body=body, content_type="application/octet-stream", headers={HEADER_LENGTH: str(hlen)}
        )

    def start(self) -> None:
        """Bind and serve on a background thread; ConfigError when the address cannot be bound."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._bind())
            except BaseException as exc:  # handed to start(): it raises it on the caller's thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="v2-http-loop", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise ConfigError(f"cannot listen on {self._host}:{self._port} for HTTP: {errors[0]}")
        log.info("KServe V2 HTTP listening on %s", self.address)

    async def _bind(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl, reuse_port=False)
        await site.start()
        server = site._server  # the bound socket: port 0 picks a free one
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self._port = sockets[0].getsockname()[1]
        self.address = str(HostPort(self._host, self._port))

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._pool.shutdown(wait=False)
        self._thread = None
