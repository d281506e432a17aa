"""An HTTP request body, read within its size bound and parsed into its Pydantic model, off the
frontend's event loop when it is large.

Off the loop means another process: `json.loads` and Pydantic's validation are C and Rust code
that hold the GIL for their whole run (0.85 s + 0.31 s for a 16 MiB body here), so a thread would
stall the loop that carries every gRPC stream and the health service just the same. A body of
more than `INLINE_PARSE_BYTES` goes to one spawned parser process; what comes back is the
validated model, whose lists are first bounded by the context (a prompt of more token ids, or a
chat of more messages, than the context holds cannot be served: each costs at least a token), so
unpickling it is cheap too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20  # as gRPC's message limit: a prompt of 1M characters fits with room
INLINE_PARSE_BYTES = 4 << 10  # larger bodies are parsed in the parser process
MAX_WAITING = 64  # large bodies queued for the parser; past it, 429


class ApiError(Exception):
    """An error as OpenAI's API returns it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def __reduce__(self):  # it crosses from the parser process
        return ApiError, (self.status, self.message, self.type, self.param, self.code)

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def field_path(loc: tuple) -> str:
    """Pydantic's location ('messages', 0, 'content') as the field path 'messages[0].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "list[int]", "list[ContentPart]", "list[str]") and not str(part).startswith(
                ("function-", "union")):
            out += f".{part}" if out else str(part)
    return out or "body"


def decode(body: bytes, model: type[BaseModel], max_items: int | None = None):
    """`body` as `model`: not JSON (or a JSON bomb) 400, a field of the wrong type or range 400
    naming it; with `max_items`, a prompt or message list longer than that 400 too."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply", param="body") from None
    except ValueError as e:  # also integers past Python's digit limit
        raise ApiError(400, f"body: not valid JSON ({e})", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body: must be a JSON object", param="body")
    if max_items is not None:
        for name in ("prompt", "messages"):
            value = data.get(name)
            if isinstance(value, list) and len(value) >= max_items:
                raise ApiError(400, f"{name}: {len(value)} items; the context holds {max_items} tokens",
                               param=name)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        name = field_path(err["loc"])
        raise ApiError(400, f"{name}: {err['msg']}", param=name) from None


def _lowest_priority() -> None:
    """The parser yields the CPU to the engines: on a small machine a second's parse at normal
    priority slows every rank's step (measured: one busy core here more than doubles the worst
    inter-token gap of 8 streams); at nice 19 it runs on what the ranks leave."""
    os.nice(19)


def _ready() -> None:
    """The parser process's first task: import what decoding needs before the first body."""
    import cluster.frontend.openai_schema  # noqa: F401  (the body models)


class BodyParser:
    """Parses large bodies in one spawned process (spawned, not forked: the frontend has threads)."""

    def __init__(self):
        self._waiting = 0
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_lowest_priority)
        pool.submit(_ready)
        return pool

    async def parse(self, body: bytes, model: type[BaseModel], max_items: int | None = None):
        if len(body) <= INLINE_PARSE_BYTES:
            return decode(body, model, max_items)
        if self._waiting >= MAX_WAITING:
            raise ApiError(429, f"{self._waiting} large request bodies are waiting to be parsed; retry later",
                           "rate_limit_error", code="rate_limit_exceeded")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, decode, body, model, max_items)
        except BrokenProcessPool:  # the parser died (killed, out of memory): a new one for the next body
            log.error("the request-body parser process died; starting another")
            self._pool = self._start()
            raise ApiError(503, "the request-body parser restarted; retry", "service_unavailable") from None
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
