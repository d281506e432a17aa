"""The OpenAI-compatible HTTP API: one more front door to the same request path.

POST /v1/completions, POST /v1/chat/completions (server-sent events with `stream: true`), GET
/v1/models, GET /health. FastAPI parses and routes, Pydantic models check the bodies, uvicorn
serves, all on the frontend's own event loop beside the gRPC server: admission, routing, resume,
drain and metrics are `Frontend.stream`'s, exactly as for tpserve.v1 and KServe.

Errors use OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}): 400 naming the
field, 401 without the bearer token, 404 for another model, 413 past the body limit, 429 when
admission is full, 503 while draining or with no replica. A client that disconnects (streamed or
not) aborts its request in the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
import functools
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.frontend.core import Frontend
from cluster.frontend.errors import classify
from cluster.frontend.http_body import MAX_BODY_BYTES, ApiError, BodyParser
from cluster.frontend.tokenize import PromptInput
from cluster.frontend.validate import InvalidArgument, NotFound, checked_params
from cluster.tls import ServerTLS
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.errors import PortInUse

log = logging.getLogger(__name__)

# OpenAI's names for the roles the chat templates know (PromptEncoder checks those, once).
ROLE_ALIASES = {"developer": "system"}


# ---- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as OpenAI's API does; fields we
    know but do not implement are refused by name."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict | None = None
    # tpserve extensions, taken as extra body fields the way vLLM takes them
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    cache_salt: str | None = None


class CompletionBody(_Body):
    prompt: str | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None


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


# ---- the API ---------------------------------------------------------------------------------------
class OpenAIApi:
    def __init__(self, frontend: Frontend, is_ready, token: str | None = None):
        self.fe, self.is_ready = frontend, is_ready
        self._expected = f"Bearer {token}".encode() if token is not None else None
        self.created = int(time.time())
        self.parser = BodyParser()
        self.app = self._build()

    @property
    def name(self) -> str:
        return self.fe.limits.name

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        presented = request.headers.getlist("authorization")
        if len(presented) != 1 or not hmac.compare_digest(presented[0].encode(), self._expected):
            self.fe.metrics.unauthenticated.inc()
            raise ApiError(401, "a valid 'Authorization: Bearer <token>' header is required",
                           "authentication_error", code="invalid_api_key")

    def _build(self) -> FastAPI:
        app = FastAPI(title="tpserve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(404)
        async def on_not_found(request: Request, exc):
            return ApiError(404, f"no route {request.url.path}", code="not_found").response()

        @app.exception_handler(405)
        async def on_bad_method(request: Request, exc):
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

        @app.get("/health")
        async def health():
            ready = self.is_ready()
            return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

        @app.get("/v1/models")
        @answered
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                "owned_by": "tpserve", "max_model_len": self.fe.limits.max_model_len}]}

        @app.post("/v1/completions")
        @answered
        async def completions(request: Request):
            self._authorize(request)
            body = await parse(request, CompletionBody, self.parser, self.fe.limits.max_model_len)
            return await self._serve(request, body, self._completion_prompt(body), chat=False)

        @app.post("/v1/chat/completions")
        @answered
        async def chat_completions(request: Request):
            self._authorize(request)
            body = await parse(request, ChatBody, self.parser, self.fe.limits.max_model_len)
            return await self._serve(request, body, self._chat_prompt(body), chat=True)

        return app

    # ---- request -> prompt and params ---------------------------------------------------------------
    def _check_common(self, body: _Body) -> None:
        if body.model != self.name:
            raise NotFound(f"model {body.model!r} is not served here; this server serves {self.name!r}")
        if body.n != 1:
            raise ApiError(400, "n: only n=1 is implemented; send n requests", param="n")
        if body.logit_bias:
            raise ApiError(400, "logit_bias: not implemented", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only with stream=true", param="stream_options")

    def _completion_prompt(self, body: CompletionBody) -> PromptInput:
        self._check_common(body)
        if body.echo:
            raise ApiError(400, "echo: not implemented", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix: not implemented", param="suffix")
        if isinstance(body.prompt, str):
            prompt = PromptInput("prompt", text=body.prompt)
        else:
            n = len(body.prompt)
            if n >= self.fe.limits.max_model_len:
                raise InvalidArgument("prompt", f"{n} tokens; the context holds {self.fe.limits.max_model_len}")
            prompt = PromptInput("prompt", token_ids=body.prompt)
        self.fe.encoder.check(prompt, self.fe.limits.max_model_len)
        return prompt

    def _chat_prompt(self, body: ChatBody) -> PromptInput:
        self._check_common(body)
        for name in ("tools", "tool_choice", "functions", "response_format"):
            if getattr(body, name) is not None:
                raise ApiError(400, f"{name}: not implemented", param=name)
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list):
                parts = []
                for j, p in enumerate(m.content):
                    if p.type != "text" or p.text is None:
                        raise InvalidArgument(f"messages[{i}].content[{j}]",
                                              f"type {p.type!r}: only text parts are supported")
                    parts.append(p.text)
                content = "".join(parts)
            else:
                content = m.content or ""
            messages.append((ROLE_ALIASES.get(m.role, m.role), content))
        prompt = PromptInput("messages", messages=messages)
        self.fe.encoder.check(prompt, self.fe.limits.max_model_len)
        return prompt

    def _params(self, body: _Body, chat: bool) -> tuple[SamplingParams, bool]:
        """(checked params, whether max_tokens is "the rest of the context", filled in after tokenizing)."""
        max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        if chat:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        else:
            logprobs = body.logprobs
        p = SamplingParams(max_tokens=1 if max_tokens is None else max_tokens, temperature=body.temperature,
                           top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                           repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                           frequency_penalty=body.frequency_penalty, seed=body.seed,
                           stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                           ignore_eos=body.ignore_eos, logprobs=logprobs, cache_salt=body.cache_salt)
        field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        try:
            p = checked_params(p, "", self.fe.limits)
        except InvalidArgument as e:
            if e.field == "max_tokens":
                raise InvalidArgument(field, e.message) from None
            if e.field == "logprobs" and chat:  # chat's count of top logprobs is its own field
                raise InvalidArgument("top_logprobs", e.message) from None
            raise
        return p, max_tokens is None

    # ---- serving ---------------------------------------------------------------------------------------
    async def _serve(self, request: Request, body: _Body, prompt: PromptInput, chat: bool):
        params, fill = self._params(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        reply = Reply(self, rid, chat, body)
        outputs = self.fe.stream(prompt, params, request_id=rid, fill_max_tokens=fill)
        if not body.stream:
            collect = asyncio.ensure_future(reply.collect(outputs))
            if not await _unless_disconnected(request, collect):
                await outputs.aclose()  # the client left: abort in the engine now
                return JSONResponse({}, status_code=499)
            return JSONResponse(collect.result())
        # Streamed: admission and validation errors come before any byte, as a status.
        first = asyncio.ensure_future(outputs.__anext__())
        try:
            if not await _unless_disconnected(request, first):
                await outputs.aclose()
                return JSONResponse({}, status_code=499)
            head = first.result()
        except StopAsyncIteration:
            head = None
        except Exception:
            await outputs.aclose()
            raise
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(reply.events(head, outputs, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- response pieces -------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.fe.encoder.tokenizer.decode([token_id])


async def _unless_disconnected(request: Request, task: asyncio.Future) -> bool:
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


class Reply:
    """Builds one request's OpenAI response objects from its engine deltas."""

    def __init__(self, api: OpenAIApi, rid: str, chat: bool, body: _Body):
        self.api, self.rid, self.chat, self.body = api, rid, chat, body
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self._offset = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.output_tokens
        if out.finished:  # "abort" as vLLM reports it: a truncated answer must not look complete
            self.finish_reason = out.finish_reason if out.finish_reason in ("length", "abort") else "stop"

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if not entries or (self.chat and not self.body.logprobs) or (not self.chat and self.body.logprobs is None):
            return None
        text = self.api.token_text
        if self.chat:
            def item(tid, lp):
                t = text(tid)
                return {"token": t, "logprob": lp, "bytes": list(t.encode())}
            return {"content": [{**item(e["token_id"], e["logprob"]),
                                 "top_logprobs": [item(t, v) for t, v in e["top"]]} for e in entries]}
        tokens = [text(e["token_id"]) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{text(t): v for t, v in e["top"]} for e in entries], "text_offset": offsets}

    async def collect(self, outputs: AsyncIterator[RequestOutput]) -> dict:
        async for out in outputs:
            self.add(out)
        choice = {"index": 0, "logprobs": self._logprobs(self.logprobs), "finish_reason": self.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        return {"id": self.rid, "object": self.object, "created": self.created, "model": self.api.name,
                "choices": [choice], "usage": self.usage}

    def _chunk(self, delta_text: str | None, out: RequestOutput | None, first: bool, usage: bool) -> dict:
        finish = self.finish_reason if out is not None and out.finished else None
        logprobs = self._logprobs(out.logprobs or []) if out is not None else None
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if delta_text:
                delta["content"] = delta_text
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.rid, "object": obj, "created": self.created, "model": self.api.name, "choices": [choice]}
        if usage:
            chunk["usage"] = None
        return chunk

    async def events(self, head: RequestOutput | None, outputs: AsyncIterator[RequestOutput],
                     include_usage: bool) -> AsyncIterator[bytes]:
        """SSE: one `data:` event per engine delta with text (and the final one), then usage when
        asked for, then `data: [DONE]`. A disconnect cancels this generator; closing `outputs`
        then aborts the request in the engine."""
        def event(obj) -> bytes:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

        try:
            first = True
            pending = [head] if head is not None else []
            while True:
                if pending:
                    out = pending.pop()
                else:
                    try:
                        out = await outputs.__anext__()
                    except StopAsyncIteration:
                        break
                self.add(out)
                if out.new_text or out.finished or first or out.logprobs:
                    yield event(self._chunk(out.new_text, out, first, include_usage))
                    first = False
            if include_usage:
                yield event({"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": self.api.name, "choices": [], "usage": self.usage})
        except Exception as e:  # after the status line: the error travels as an event, as OpenAI's does
            err = api_error(e) or ApiError(500, f"{type(e).__name__} (see the server log)", "server_error")
            yield event({"error": {"message": err.message, "type": err.type, "param": err.param,
                                   "code": err.code}})
        finally:
            await outputs.aclose()
        yield b"data: [DONE]\n\n"


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers of its own: SIGTERM stays the frontend's (its drain)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving the API on the frontend's event loop (TLS and the token as for gRPC)."""

    def __init__(self, api: OpenAIApi, host: str, port: int, tls: ServerTLS | None = None):
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

