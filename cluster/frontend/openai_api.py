"""The OpenAI-compatible HTTP API: one more front door to the same request path.

POST /v1/completions, POST /v1/chat/completions (server-sent events with `stream: true`), GET
/v1/models and /v1/models/{id}, GET /health, and vLLM's POST /tokenize and /detokenize. This file
maps the routes and each body onto the request path's PromptInput and SamplingParams, one
request per choice (`n` samples of each prompt of a batch: `fanout`); the bodies are
`openai_schema`, the replies `openai_reply`, the HTTP plumbing (size bounds, errors, disconnects,
uvicorn) `http_server`. FastAPI parses and routes, Pydantic models check the bodies, uvicorn
serves, all on the frontend's own event loop beside the gRPC server: admission, routing, resume,
drain and metrics are `Frontend.stream`'s, exactly as for tpserve.v1 and KServe.

Completions' `echo` repeats the prompt before each choice's text (with `logprobs`, its tokens'
logprobs, the first null, from the prefill's logits); vLLM's `prompt_logprobs` returns them in
vLLM's shape on both endpoints.

Errors use OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}): 400 naming the
field, 401 without the bearer token, 404 for another model, 413 past the body limit, 429 when
admission is full, 503 while draining or with no replica. A client that disconnects (streamed or
not) aborts its requests in the engine.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.frontend.core import Frontend
from cluster.frontend.http_body import ApiError, BodyParser
from cluster.frontend.http_server import answered, parse, unless_disconnected
from cluster.frontend.fanout import FanOut
from cluster.frontend.openai_reply import Choice, Echo, Reply
from cluster.frontend.openai_structured import structured_spec
from cluster.frontend.openai_tools import tool_spec
from cluster.frontend.tool_parsers import PARSERS
from cluster.frontend.openai_schema import ChatBody, CompletionBody, DetokenizeBody, Message, RequestBody, TokenizeBody
from cluster.frontend.request import FrontendRequest
from cluster.frontend.tokenize import PromptInput
from cluster.frontend.validate import InvalidArgument, build_params, check_model, check_prompt_ids
from workers.engine.sampling_params import SamplingParams
from workers.engine.structured import check_spec

log = logging.getLogger(__name__)

# OpenAI's and vLLM's default for /v1/completions without max_tokens (chat's is the rest of the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Choices per request (prompts x n): each is an engine request, admitted like any other.
MAX_CHOICES = 128
# OpenAI's names for the roles the chat templates know (PromptEncoder checks those, once).
ROLE_ALIASES = {"developer": "system"}


# ---- the API ---------------------------------------------------------------------------------------
class OpenAIApi:
    def __init__(self, frontend: Frontend, is_ready, token: str | None = None, tool_parser: str | None = None):
        """`tool_parser`: the model's tool-call format for `tool_choice: "auto"` (vLLM's
        --enable-auto-tool-choice --tool-call-parser); None refuses "auto"."""
        self.fe, self.is_ready = frontend, is_ready
        self.tool_parser = PARSERS[tool_parser]() if tool_parser is not None else None
        # Decoding drops special tokens; a format whose start tag this tokenizer marks special
        # (some Hermes tunes) needs it kept for the parser to see the call.
        start = self.tool_parser.start_token if self.tool_parser is not None else None
        self._keep_special = start is not None and start in getattr(frontend.encoder.tokenizer, "all_special_tokens", ())
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
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        @answered
        async def model(request: Request):
            self._authorize(request)
            check_model(request.path_params["model_id"], self.name, required=True)
            return self._model_card()

        @app.post("/tokenize")
        @answered
        async def tokenize(request: Request):
            self._authorize(request)
            body = await parse(request, TokenizeBody, self.parser, self.fe.limits.max_model_len)
            check_model(body.model or "", self.name, required=False)
            if (body.prompt is None) == (body.messages is None):
                raise ApiError(400, "prompt: give exactly one of prompt and messages", param="prompt")
            prompt = PromptInput("prompt", text=body.prompt) if body.prompt is not None else \
                PromptInput("messages", messages=self._messages(body.messages))
            self.fe.encoder.check(prompt)
            ids = await self.fe.encoder.encode(prompt)
            return {"count": len(ids), "max_model_len": self.fe.limits.max_model_len, "tokens": ids}

        @app.post("/detokenize")
        @answered
        async def detokenize(request: Request):
            self._authorize(request)
            body = await parse(request, DetokenizeBody, self.parser, self.fe.limits.max_model_len)
            check_model(body.model or "", self.name, required=False)
            check_prompt_ids(body.tokens, 0, self.fe.limits, "tokens")
            text = await self.fe.encoder.run(self.fe.encoder.tokenizer.decode, body.tokens)
            return {"prompt": text}

        @app.post("/v1/completions")
        @answered
        async def completions(request: Request):
            self._authorize(request)
            body = await parse(request, CompletionBody, self.parser, self.fe.limits.max_model_len)
            return await self._serve(request, body, self._completion_prompts(body), chat=False)

        @app.post("/v1/chat/completions")
        @answered
        async def chat_completions(request: Request):
            self._authorize(request)
            body = await parse(request, ChatBody, self.parser, self.fe.limits.max_model_len)
            return await self._serve(request, body, self._chat_prompts(body), chat=True)

        return app

    # ---- request -> prompt and params ---------------------------------------------------------------
    def _check_common(self, body: RequestBody, prompts: int = 1) -> None:
        check_model(body.model, self.name, required=True)
        if not 1 <= body.n <= MAX_CHOICES:
            raise InvalidArgument("n", f"must be in [1, {MAX_CHOICES}], got {body.n}")
        if body.n * prompts > MAX_CHOICES:
            raise InvalidArgument("prompt", f"{prompts} prompts x n={body.n} choices; at most {MAX_CHOICES} "
                                            f"choices per request")
        if body.logit_bias:
            raise ApiError(400, "logit_bias: not implemented", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only with stream=true", param="stream_options")

    def _completion_prompts(self, body: CompletionBody) -> list[PromptInput]:
        """One prompt, or a batch: a list of strings or of token-id lists (one choice each)."""
        p = body.prompt
        if isinstance(p, list) and not p:
            raise InvalidArgument("prompt", "is empty")
        if isinstance(p, str) or isinstance(p[0], int):
            batch, names = [p], ["prompt"]
        else:
            batch, names = p, [f"prompt[{i}]" for i in range(len(p))]
        self._check_common(body, len(batch))
        if body.suffix:
            raise ApiError(400, "suffix: not implemented", param="suffix")
        prompts = []
        for name, one in zip(names, batch):
            if isinstance(one, str):
                prompt = PromptInput(name, text=one)
            else:
                if len(one) >= self.fe.limits.max_model_len:
                    raise InvalidArgument(name, f"{len(one)} tokens; the context holds {self.fe.limits.max_model_len}")
                prompt = PromptInput(name, token_ids=one)
            self.fe.encoder.check(prompt, self.fe.limits.max_model_len)
            prompts.append(prompt)
        return prompts

    def _chat_prompts(self, body: ChatBody) -> list[PromptInput]:
        self._check_common(body)
        if body.functions is not None:
            raise ApiError(400, "functions: not implemented (the deprecated form; use tools)", param="functions")
        offered = body.tools if body.tools is not None and body.tool_choice != "none" else None
        prompt = PromptInput("messages", messages=self._messages(body.messages), tools=offered)
        self.fe.encoder.check(prompt, self.fe.limits.max_model_len)
        return [prompt]

    @staticmethod
    def _messages(messages: list[Message]) -> list[tuple]:
        """(role, text[, tool fields]) per message; content parts other than text are refused naming them."""
        out = []
        for i, m in enumerate(messages):
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
            extra = {k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                        ("name", m.name)) if v is not None}
            out.append((ROLE_ALIASES.get(m.role, m.role), content, extra) if extra else
                       (ROLE_ALIASES.get(m.role, m.role), content))
        return out

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tpserve",
                "max_model_len": self.fe.limits.max_model_len}

    def _params(self, body: RequestBody, chat: bool) -> tuple[SamplingParams, bool]:
        """(checked params, whether max_tokens is "the rest of the context", filled in after tokenizing)."""
        max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        if chat:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        else:
            logprobs = body.logprobs
        field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:  # lowered to the rest of the context after tokenizing (FrontendRequest)
            default = self.fe.limits.max_model_len if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        values = {"max_tokens": default if max_tokens is None else max_tokens, "temperature": body.temperature,
                  "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
                  "repetition_penalty": body.repetition_penalty, "presence_penalty": body.presence_penalty,
                  "frequency_penalty": body.frequency_penalty, "seed": body.seed,
                  "stop": [body.stop] if isinstance(body.stop, str) else (body.stop or []),
                  "ignore_eos": body.ignore_eos, "logprobs": logprobs, "cache_salt": body.cache_salt,
                  "prompt_logprobs": self._prompt_logprobs(body, chat)}
        # chat's count of top logprobs is its own field
        p = build_params(values, self.fe.limits, names={"max_tokens": field,
                                                        "logprobs": "top_logprobs" if chat else "logprobs"})
        p.skip_special_tokens = body.skip_special_tokens
        return p, max_tokens is None

    @staticmethod
    def _prompt_logprobs(body: RequestBody, chat: bool) -> int | None:
        """Prompt tokens to score: vLLM's `prompt_logprobs`, or completions' `echo` with `logprobs`
        (the echoed prompt's tokens carry theirs, as OpenAI's legacy API)."""
        if body.prompt_logprobs is not None:
            return body.prompt_logprobs
        if not chat and body.echo and body.logprobs is not None:
            return body.logprobs
        return None

    # ---- serving ---------------------------------------------------------------------------------------
    async def _serve(self, request: Request, body: RequestBody, prompts: list[PromptInput], chat: bool):
        params, fill = self._params(body, chat)
        structured = structured_spec(body)
        tools = tool_spec(body, self.tool_parser) if chat else None
        if tools is not None and tools[0] is not None:
            if structured is not None:
                raise InvalidArgument("tool_choice", f"a tool choice constrains the output; {structured[1]} too")
            structured = (tools[0], "tool_choice")
        if tools is not None and tools[1].parser is not None and self._keep_special:
            params.skip_special_tokens = False  # the format's start tag must reach the parser
        if structured is not None:  # parsed off the loop (a large schema takes milliseconds)
            await self.fe.encoder.run(check_spec, *structured)
            params.structured = structured[0]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        echoes: list[Echo | None] = [None] * len(prompts)
        if not chat and body.echo:  # the prompt's own tokens, to repeat and to label their logprobs
            for i, prompt in enumerate(prompts):
                ids = prompt.token_ids if prompt.token_ids is not None else await self.fe.encoder.encode(prompt)
                text = prompt.text if prompt.text is not None else \
                    await self.fe.encoder.run(self.fe.encoder.tokenizer.decode, ids)
                echoes[i] = Echo(text, list(ids))
                prompts[i] = PromptInput(prompt.field, token_ids=list(ids))
        n = body.n
        requests, choices = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                child = copy.copy(params)
                if child.seed is not None and j:  # choice j draws from its own seeded stream
                    child.seed = (child.seed + j) % 2**63
                index = i * n + j
                requests.append(FrontendRequest(prompt, child, request_id=rid if len(prompts) * n == 1 else
                                                f"{rid}-{index}", fill_max_tokens=fill))
                choices.append(Choice(index, echoes[i]))
        reply = Reply(self, rid, chat, body, choices, n, tools=tools[1] if tools is not None else None)
        fan = FanOut(self.fe, requests, n)
        merged = fan.merged()
        if not body.stream:
            collect = asyncio.ensure_future(reply.collect(merged))
            if not await unless_disconnected(request, collect):
                await merged.aclose()
                await fan.close()  # the client left: abort every choice in the engine now
                return JSONResponse({}, status_code=499)
            return JSONResponse(collect.result())
        # Streamed: admission and validation errors come before any byte, as a status.
        first = asyncio.ensure_future(merged.__anext__())
        try:
            if not await unless_disconnected(request, first):
                await merged.aclose()
                await fan.close()
                return JSONResponse({}, status_code=499)
            head = first.result()
        except StopAsyncIteration:
            head = None
        except Exception:
            await merged.aclose()
            await fan.close()
            raise

        async def replay():
            if head is not None:
                yield head
            async for item in merged:
                yield item

        async def close():
            await merged.aclose()
            await fan.close()

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(reply.events(replay(), include_usage, close), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- response pieces -------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.fe.encoder.tokenizer.decode([token_id])
