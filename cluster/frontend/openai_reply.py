"""One request's OpenAI response objects (a completion or chat completion, or its stream of
server-sent events) built from its engine deltas."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from cluster.frontend.http_body import ApiError
from cluster.frontend.http_server import api_error
from cluster.frontend.openai_schema import RequestBody
from workers.engine.outputs import RequestOutput


class Reply:
    """Builds one request's OpenAI response objects from its engine deltas."""

    def __init__(self, api, rid: str, chat: bool, body: RequestBody):
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
