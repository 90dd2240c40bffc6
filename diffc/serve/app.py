"""The FastAPI app: routes, OpenAI-format errors, a request-body limit and per-route HTTP metrics."""

from __future__ import annotations

import contextlib
import logging

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from .engine import Engine
from .hardening import host_allowed, host_error, method_label, route_label
from .metrics import ServerMetrics
from .protocol import APIError
from .edit_routes import edit_router
from .lora_routes import allowed_dirs, lora_router
from .routes import public, v1
from .uploads import DECODE_SLOTS

log = logging.getLogger("diffc.serve")

BODY_METHODS = {"POST", "PUT", "PATCH"}
CLIENT_GONE = object()  # Guard._read_body: the client disconnected mid-body


def _error_response(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None,
                    headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware: refuses a ``Host`` not in ``allowed_hosts`` (400; None: any) and bodies over
    ``max_body_bytes`` (413), and counts every HTTP answer (known methods and route templates only)."""

    def __init__(self, app, max_body_bytes: int, metrics: ServerMetrics, allowed_hosts: list[str] | None = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed_hosts):
                err = host_error(host, self.allowed_hosts)
                return await JSONResponse(err.body(), status_code=err.status)(scope, receive, counting_send)
            if scope["method"] in BODY_METHODS:
                body = await self._read_body(scope, receive)
                if body is None:
                    response = _error_response(413, f"The request body is larger than this server's limit of "
                                                    f"{self.max_body_bytes} bytes (--max-body-bytes).",
                                               code="request_too_large")
                    return await response(scope, receive, counting_send)
                if body is CLIENT_GONE:  # it left before its body ended: what arrived is not its request
                    status["code"] = 499
                    return
                receive = self._replay(body, receive)
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests.labels(method_label(scope["method"]), route_label(scope),
                                              str(status["code"])).inc()

    async def _read_body(self, scope, receive):
        """The whole body; None when it is over the limit; ``CLIENT_GONE`` when the client disconnected before
        sending all of it (a truncated JSON object or form would still parse and queue a job nobody waits for)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return CLIENT_GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               shutdown_timeout_s: float = 60.0, lora_dirs=(), max_loras: int = 32,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The server for ``engine``. Its lifespan starts the engine and, at shutdown, drains it.

    ``allowed_hosts``: the host names a request's ``Host`` header may name (None: any; see
    ``hardening.default_allowed_hosts``).

    ``lora_dirs``: the only directories ``POST /v1/set_lora`` may load files from (none: it loads no
    file, only adapters already cached); ``max_loras``: adapters the host cache holds at most.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.state == "starting":
            engine.start()
        yield
        await anyio.to_thread.run_sync(engine.shutdown, shutdown_timeout_s)

    app = FastAPI(title="diffc", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.api_key = engine, api_key or None
    app.state.lora_dirs, app.state.max_loras = allowed_dirs(lora_dirs), max_loras
    app.state.lora_loading = anyio.Lock()  # set_lora's loads, one at a time (see lora_routes)
    app.state.decodes = anyio.CapacityLimiter(DECODE_SLOTS)  # uploads decoded at once (see uploads)
    for router in (public, v1, lora_router, edit_router):
        for route in router.routes:  # a server that answers GET answers HEAD too (RFC 9110): curl -I, probes
            if isinstance(route, APIRoute) and "GET" in route.methods:
                route.methods.add("HEAD")
        app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = str(err.get("loc", ("", ""))[-1]) or None
        return _error_response(400, f"Invalid value for '{param}': {err.get('msg')}.", param=param,
                               code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        messages = {404: f"Unknown route: {request.method} {request.url.path}",
                    405: f"Method {request.method} is not allowed on {request.url.path}"}
        return _error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                               code="not_found" if exc.status_code == 404 else None, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error",
                               code="internal_error")

    app.add_middleware(Guard, max_body_bytes=max_body_bytes, metrics=engine.metrics, allowed_hosts=allowed_hosts)
    return app
