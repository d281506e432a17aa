"""One OpenAI response (a completion or chat completion, or its stream of server-sent events)
built from the engine deltas of its choices.

A response has one choice per (prompt, n) pair: choice `i * n + j` is prompt i's j-th sample, as
OpenAI and vLLM number them. Each choice is its own engine request (`OpenAIApi` fans them out);
`Reply` merges their deltas: joined for a whole response, interleaved by `index` for a stream.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.frontend.http_body import ApiError
from cluster.frontend.http_server import api_error
from cluster.frontend.openai_schema import RequestBody
from cluster.frontend.openai_tools import ToolMode
from cluster.frontend.tool_parsers import call
from workers.engine.outputs import RequestOutput


@dataclass(slots=True)
class Echo:
    """The prompt a completions choice repeats before its text (`echo: true`)."""

    text: str
    token_ids: list[int]


class Choice:
    """One choice's deltas, joined."""

    def __init__(self, index: int, echo: Echo | None = None):
        self.index, self.echo = index, echo
        self.text, self.token_ids, self.logprobs = "", [], []
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.offset = 0  # legacy logprobs' text_offset: characters before the next token

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.output_tokens
        self.cached_tokens = max(self.cached_tokens, out.cached_prompt_tokens)
        if out.finished:  # "abort" as vLLM reports it: a truncated answer must not look complete
            self.finish_reason = out.finish_reason if out.finish_reason in ("length", "abort") else "stop"


class Reply:
    """Builds one response's objects from the deltas of its choices."""

    def __init__(self, api, rid: str, chat: bool, body: RequestBody, choices: list[Choice], n: int,
                 tools: ToolMode | None = None):
        self.api, self.rid, self.chat, self.body = api, rid, chat, body
        self.choices, self.n = choices, n
        self.tools = tools  # chat's tool_choice: the output becomes message.tool_calls (openai_tools)
        self._call_ids: dict[int, str] = {}  # a streamed named call's id, per choice
        self._sent: dict[int, int] = {}  # "auto", streamed: characters of each choice's text sent as content
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    # ---- pieces ------------------------------------------------------------------------------------
    @property
    def usage(self) -> dict:
        # A prompt counts once however many choices sample it (as vLLM counts n > 1).
        prompts = self.choices[::self.n]
        prompt = sum(c.prompt_tokens for c in prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in self.choices)}}

    def _logprobs(self, choice: Choice, entries: list[dict], echo: bool = False) -> dict | None:
        """The choice's logprobs object for `entries` (new tokens), preceded by the echoed prompt's
        tokens (the first one's logprob null, as OpenAI's legacy API) when `echo`."""
        if (self.chat and not self.body.logprobs) or (not self.chat and self.body.logprobs is None):
            return None
        if not entries and not echo:
            return None
        text = self.api.token_text
        if self.chat:
            def item(tid, lp):
                t = text(tid)
                return {"token": t, "logprob": lp, "bytes": list(t.encode())}
            return {"content": [{**item(e["token_id"], e["logprob"]),
                                 "top_logprobs": [item(t, v) for t, v in e["top"]]} for e in entries]}
        rows: list[tuple[int, float | None, dict | None]] = []
        if echo:
            scored = choice.prompt_logprobs or [None] * len(choice.echo.token_ids)
            for tid, e in zip(choice.echo.token_ids, scored):
                rows.append((tid, None, None) if e is None else (tid, e["logprob"], self._top(e)))
        rows += [(e["token_id"], e["logprob"], self._top(e)) for e in entries]
        tokens = [text(tid) for tid, _, _ in rows]
        offsets = []
        for t in tokens:
            offsets.append(choice.offset)
            choice.offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in rows],
                "top_logprobs": [top for _, _, top in rows], "text_offset": offsets}

    def _top(self, entry: dict) -> dict:
        """Legacy top_logprobs: the top-n by text, and the token itself (as OpenAI and vLLM give it)."""
        text = self.api.token_text
        top = {text(t): v for t, v in entry["top"]}
        top.setdefault(text(entry["token_id"]), entry["logprob"])
        return top

    def _prompt_logprobs(self, choice: Choice) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob,
        rank, decoded_token}}, the prompt token and the top-n."""
        if choice.prompt_logprobs is None:
            return None
        text = self.api.token_text
        out: list = []
        for e in choice.prompt_logprobs:
            if e is None:
                out.append(None)
                continue
            ranked = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": text(t)} for r, (t, v) in enumerate(e["top"])}
            ranked.setdefault(str(e["token_id"]), {"logprob": e["logprob"], "rank": e.get("rank"),
                                                   "decoded_token": text(e["token_id"])})
            out.append(ranked)
        return out

    # ---- a whole response --------------------------------------------------------------------------
    async def collect(self, merged: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
        async for i, out in merged:
            self.choices[i].add(out)
        choices = []
        for c in self.choices:
            echo = c.echo is not None
            choice = {"index": c.index, "logprobs": self._logprobs(c, c.logprobs, echo=echo),
                      "finish_reason": c.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                content, calls = self.tools.split(c.text) if self.tools is not None and c.finish_reason == "stop" \
                    else (c.text, None)
                if calls:
                    choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                    choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = (c.echo.text if echo else "") + c.text
                if self.body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs(c)
            choices.append(choice)
        reply = {"id": self.rid, "object": self.object, "created": self.created, "model": self.api.name,
                 "choices": choices, "usage": self.usage}
        if self.chat and self.body.prompt_logprobs is not None:  # vLLM's chat puts it beside the choices
            reply["prompt_logprobs"] = self._prompt_logprobs(self.choices[0])
        return reply

    # ---- a stream ----------------------------------------------------------------------------------
    def _chunk(self, choice: Choice, out: RequestOutput | None, first: bool, usage: bool) -> dict:
        finish = choice.finish_reason if out is not None and out.finished else None
        delta_text = out.new_text if out is not None else ""
        echo = first and choice.echo is not None
        entries = (out.logprobs or []) if out is not None else []
        logprobs = self._logprobs(choice, entries, echo=echo) if out is not None else None
        if self.chat and self.tools is not None:
            delta, finish = self._tool_delta(choice, delta_text, first, finish)
            body = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        elif self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if delta_text:
                delta["content"] = delta_text
            body = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            body = {"index": choice.index, "text": (choice.echo.text if echo else "") + (delta_text or ""),
                    "logprobs": logprobs, "finish_reason": finish}
            if first and self.body.prompt_logprobs is not None:
                body["prompt_logprobs"] = self._prompt_logprobs(choice)
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.rid, "object": obj, "created": self.created, "model": self.api.name, "choices": [body]}
        if usage:
            chunk["usage"] = None
        return chunk

    def _tool_delta(self, choice: Choice, delta_text: str, first: bool, finish: str | None) -> tuple[dict, str | None]:
        """Streamed tool calls as the `openai` client assembles them (by `index`): a named call's
        id and name first, then its arguments as they are generated; "required"'s array of calls
        (known only once it parses) whole, in the last chunk; "auto"'s text as content up to where a
        call may start (the parser's `held_from`), the rest at the end as calls, or as content."""
        if self.tools.parser is not None:
            return self._auto_delta(choice, first, finish)
        delta: dict = {"role": "assistant", "content": None} if first else {}
        if self.tools.named is not None:
            part: dict = {"index": 0, "function": {"arguments": delta_text or ""}}
            if choice.index not in self._call_ids:
                self._call_ids[choice.index] = call(self.tools.named, "")["id"]
                part.update(id=self._call_ids[choice.index], type="function")
                part["function"]["name"] = self.tools.named
            if delta_text or "id" in part:
                delta["tool_calls"] = [part]
        elif finish is not None:
            calls = self.tools.split(choice.text)[1] if choice.finish_reason == "stop" else None
            if calls:
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
            elif choice.text:
                delta["content"] = choice.text  # cut short: what there is, as text
        if finish == "stop" and (self.tools.named is not None or "tool_calls" in delta):
            finish = "tool_calls"
        return delta, finish

    def _auto_delta(self, choice: Choice, first: bool, finish: str | None) -> tuple[dict, str | None]:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        sent = self._sent.get(choice.index, 0)
        if finish is None:
            upto = self.tools.parser.held_from(choice.text)
        else:
            content, calls = self.tools.split(choice.text) if choice.finish_reason == "stop" else (choice.text, None)
            upto = len(content or "") if calls else len(choice.text)
            if calls:
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                finish = "tool_calls"
        if upto > sent:
            delta["content"] = choice.text[sent:upto]
            self._sent[choice.index] = upto
        return delta, finish

    async def events(self, merged: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool,
                     close) -> AsyncIterator[bytes]:
        """SSE: one `data:` event per engine delta with text (and each choice's first and final
        one), tagged with its choice's index; then usage when asked for, then `data: [DONE]`. A
        disconnect cancels this generator; `close()` then aborts every choice's request."""
        def event(obj) -> bytes:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

        started: set[int] = set()
        try:
            async for i, out in merged:
                choice = self.choices[i]
                choice.add(out)
                first = i not in started
                if out.new_text or out.finished or first or out.logprobs:
                    started.add(i)
                    yield event(self._chunk(choice, out, first, include_usage))
            if include_usage:
                yield event({"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": self.api.name, "choices": [], "usage": self.usage})
        except Exception as e:  # after the status line: the error travels as an event, as OpenAI's does
            err = api_error(e) or ApiError(500, f"{type(e).__name__} (see the server log)", "server_error")
            yield event({"error": {"message": err.message, "type": err.type, "param": err.param,
                                   "code": err.code}})
        finally:
            await close()
        yield b"data: [DONE]\n\n"
