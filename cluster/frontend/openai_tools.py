"""Tool calls on the chat endpoint: `tools` and `tool_choice` onto a structured-output spec, and
the constrained output back into `message.tool_calls`.

- `"none"`: the tools are not offered; the answer is text.
- `"required"`: the output is held (xgrammar) to a JSON array of calls, each `{"name": one of the
  tools, "parameters": that tool's parameter schema}` (one call when `parallel_tool_calls` is
  false), as vLLM does; returned as `tool_calls` with `finish_reason: "tool_calls"`.
- a named function (`{"type": "function", "function": {"name": ...}}`): the output is held to
  that tool's parameter schema and is the call's `arguments`.
- `"auto"` (the default when tools are given) needs a parser for the model's own tool-call
  format (vLLM's `--enable-auto-tool-choice --tool-call-parser`); none is built here, so it is a
  400 naming `tool_choice`.
The chat template receives the tools (where it renders them), and assistant messages with
`tool_calls` and `tool` messages go back through it.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from cluster.frontend.validate import InvalidArgument
from workers.engine.structured import StructuredSpec

MAX_TOOLS = 128


@dataclass(slots=True)
class ToolMode:
    """How the answer becomes tool calls: a named function's arguments, or an array of calls."""

    named: str | None  # the function whose arguments the whole output is; None: "required"

    def calls(self, text: str) -> list[dict] | None:
        """The output as OpenAI tool calls; None if it does not parse (cut short by max_tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            return [call(self.named, text)]
        return [call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]


def call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def tool_spec(body) -> tuple[StructuredSpec, ToolMode] | None:
    """The spec and mode for `tools` + `tool_choice`; None when the answer is free text."""
    tools, choice = body.tools, body.tool_choice
    if tools is None:
        if choice not in (None, "none"):
            raise InvalidArgument("tool_choice", "needs tools")
        return None
    functions = _functions(tools)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if choice == "auto":
        raise InvalidArgument("tool_choice", '"auto" needs a parser for the model\'s own tool-call format '
                                             '(vLLM\'s --enable-auto-tool-choice), which tpserve does not have; '
                                             'use "required" or name a function')
    if choice == "required":
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for name, params in functions.items()]}
        schema = {"type": "array", "items": items, "minItems": 1}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return StructuredSpec("json_schema", json.dumps(schema)), ToolMode(None)
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InvalidArgument("tool_choice", 'must be "none", "auto", "required" or {"type": "function", '
                                             '"function": {"name": ...}}')
    if name not in functions:
        raise InvalidArgument("tool_choice", f"names {name!r}, which is not one of the tools")
    return StructuredSpec("json_schema", json.dumps(functions[name])), ToolMode(name)


def _functions(tools) -> dict[str, dict]:
    """name -> parameter schema, checked."""
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"must be a list of 1 to {MAX_TOOLS} tools")
    out = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise InvalidArgument(f"tools[{i}]", 'must be {"type": "function", "function": {"name", "parameters"}}')
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidArgument(f"tools[{i}].function.parameters", "must be a JSON schema object")
        if f["name"] in out:
            raise InvalidArgument(f"tools[{i}].function.name", f"{f['name']!r} is given twice")
        out[f["name"]] = params
    return out
