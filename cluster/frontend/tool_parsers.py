"""Parsers of a model's own tool-call format, for `tool_choice: "auto"` (vLLM's
`--enable-auto-tool-choice --tool-call-parser NAME`): the model decides whether to call a tool, and
its text is split into the content before the calls and the calls.

- `hermes` (Hermes 2 Pro, Qwen 2.5 and 3, and the many models tuned on their format): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text before the first call is content.
- `llama3_json` (Llama 3.1-3.3's JSON tool calling): the whole answer is one or more
  `{"name": ..., "parameters": {...}}` objects (`arguments` also read), separated by `;`,
  optionally after `<|python_tag|>`; an answer that starts otherwise is content.

Output that does not parse as calls is returned as content, whole, as vLLM does: a model that
starts a call and writes invalid JSON gets its text back, not an error. While streaming,
`held_from` says how much of the text so far is certainly content (a call's start, or what may yet
become one, is held back until the answer ends and is parsed whole).
"""
from __future__ import annotations

import json
import re
import uuid


def call(name: str, arguments: str) -> dict:
    """One OpenAI tool call."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _arguments(value) -> str:
    if isinstance(value, str):  # already a JSON string, as some templates write it
        json.loads(value)
        return value
    if not isinstance(value, dict):
        raise TypeError("arguments must be an object")
    return json.dumps(value, ensure_ascii=False)


def _name(obj) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise TypeError("a call needs a name")
    return obj["name"]


class ToolParser:
    name = ""
    # A special token the format starts with, which decoding must keep (e.g. a tokenizer that marks
    # <tool_call> special would drop it from the text); None when the format is plain text.
    start_token: str | None = None

    def parse(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, calls): calls None when the text is not a tool call (content is then the text)."""
        raise NotImplementedError

    def held_from(self, text: str) -> int:
        """Characters of `text`, a prefix of the answer, that are content whatever comes next."""
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    start_token = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def parse(self, text):
        start = text.find(self.start_token)
        if start < 0:
            return text, None
        try:
            calls = []
            for m in self._CALL.finditer(text, start):
                obj = json.loads(m.group(1) if m.group(1) is not None else m.group(2))
                calls.append(call(_name(obj), _arguments(obj.get("arguments", {}))))
        except (ValueError, TypeError):
            return text, None
        return (text[:start] or None), calls

    def held_from(self, text):
        start = text.find(self.start_token)
        if start >= 0:
            return start
        # The end may be the start of "<tool_call>": hold that much back.
        for k in range(min(len(self.start_token) - 1, len(text)), 0, -1):
            if self.start_token.startswith(text[-k:]):
                return len(text) - k
        return len(text)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def _body(self, text: str) -> str | None:
        s = text.lstrip()
        if s.startswith(self.TAG):
            s = s[len(self.TAG):].lstrip()
        return s if s.startswith("{") else None

    def parse(self, text):
        s = self._body(text)
        if s is None:
            return text, None
        decoder, calls, pos = json.JSONDecoder(), [], 0
        try:
            while pos < len(s):
                obj, pos = decoder.raw_decode(s, pos)
                args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
                calls.append(call(_name(obj), _arguments(args)))
                while pos < len(s) and (s[pos].isspace() or s[pos] == ";"):
                    pos += 1
        except (ValueError, TypeError):
            return text, None
        return None, calls

    def held_from(self, text):
        s = text.lstrip()
        if not s or s.startswith("{") or s.startswith(self.TAG) or self.TAG.startswith(s):
            return 0  # a call may be coming: nothing is known to be content yet
        return len(text)


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}
