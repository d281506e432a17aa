"""HTTP plumbing of the OpenAI-compatible API: bodies read with a size bound, errors in OpenAI's
JSON shape from the frontend's one error table, client disconnects, and uvicorn on the
frontend's own event loop."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket

import uvicorn
from fastapi import Request
from pydantic import BaseModel

from cluster.frontend.errors import classify
from cluster.frontend.http_body import MAX_BODY_BYTES, ApiError, BodyParser
from cluster.frontend.validate import NotFound
from cluster.tls import ServerTLS
from workers.errors import PortInUse

log = logging.getLogger(__name__)


def api_error(exc: BaseException) -> ApiError | None:
    """The HTTP error for an error we expect (`errors.TABLE`, the gRPC servicers' too); None for a bug."""
    if isinstance(exc, ApiError):
        return exc
    status = classify(exc)
    if status is None:
        return None
    param = getattr(exc, "field", None) or ("model" if isinstance(exc, NotFound) else None)
    return ApiError(status.http_status, str(exc), status.http_type, param=param, code=status.http_code)


async def parse(request: Request, model: type[BaseModel], parser: BodyParser, max_items: int | None = None):
    """The body as `model`: past the size limit 413, then `http_body.decode`'s checks (a large
    body parsed off the event loop)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {declared} bytes; at most {MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return await parser.parse(bytes(body), model, max_items)


def answered(handler):
    """Every expected error becomes its OpenAI error response; anything else a logged 500."""
    @functools.wraps(handler)
    async def wrapped(request: Request):
        try:
            return await handler(request)
        except Exception as e:
            err = api_error(e)
            if err is None:
                log.exception("%s %s failed", request.method, request.url.path)
                err = ApiError(500, f"{type(e).__name__} (see the server log)", "server_error")
            return err.response()
    return wrapped


async def unless_disconnected(request: Request, task: asyncio.Future) -> bool:
    """Wait for `task`; False (and the task cancelled) if the client disconnects first."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers of its own: SIGTERM stays the frontend's (its drain)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving the API on the frontend's event loop (TLS and the token as for gRPC)."""

    def __init__(self, api, host: str, port: int, tls: ServerTLS | None = None):
        self.api = api
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise PortInUse("http-port", f"cannot listen on {host}:{port} ({e.strerror}); pick another with "
                                         f"--http-port (0 turns the HTTP API off)") from None
        self.port = self.sock.getsockname()[1]
        ssl = {}
        if tls is not None and tls.enabled:
            import ssl as _ssl

            ssl = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
            if tls.client_ca:
                ssl.update(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=_ssl.CERT_REQUIRED)
        config = uvicorn.Config(api.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, **ssl)
        self.server = _QuietServer(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError("the HTTP server did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, timeout=5)
        self.sock.close()
        self.api.parser.close()
