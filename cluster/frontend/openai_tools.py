"""Tool calls on the chat endpoint: `tools` and `tool_choice` onto a structured-output spec, and
the constrained output back into `message.tool_calls`.

- `"none"`: the tools are not offered; the answer is text.
- `"required"`: the output is held (xgrammar) to a JSON array of calls, each `{"name": one of the
  tools, "parameters": that tool's parameter schema}` (one call when `parallel_tool_calls` is
  false), as vLLM does; returned as `tool_calls` with `finish_reason: "tool_calls"`.
- a named function (`{"type": "function", "function": {"name": ...}}`): the output is held to
  that tool's parameter schema and is the call's `arguments`.
- `"auto"` (the default when tools are given): the model decides; its own tool-call format is
  parsed out of its answer (`tool_parsers`) when the server runs with vLLM's
  `--enable-auto-tool-choice --tool-call-parser hermes|llama3_json`; without them, a 400 naming
  `tool_choice`. The output is not constrained (a structured-output field may still apply).
The chat template receives the tools (where it renders them), and assistant messages with
`tool_calls` and `tool` messages go back through it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from cluster.frontend.tool_parsers import ToolParser, call
from cluster.frontend.validate import InvalidArgument
from workers.engine.structured import StructuredSpec

MAX_TOOLS = 128


@dataclass(slots=True)
class ToolMode:
    """How the answer becomes tool calls: a named function's arguments, an array of calls
    ("required"), or the model's own format parsed ("auto")."""

    named: str | None = None  # the function whose arguments the whole output is
    parser: ToolParser | None = None  # "auto": the model's own format

    def split(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, calls); calls None when the output is not calls (a constrained output cut short
        by max_tokens, or an "auto" answer in text), and content is then the text."""
        if self.parser is not None:
            return self.parser.parse(text)
        try:
            value = json.loads(text)
        except ValueError:
            return text, None
        if self.named is not None:
            return None, [call(self.named, text)]
        return None, [call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]


def tool_spec(body, parser: ToolParser | None = None) -> tuple[StructuredSpec | None, ToolMode] | None:
    """The spec and mode for `tools` + `tool_choice`; None when the answer is free text. `parser`:
    the server's `--tool-call-parser` when `--enable-auto-tool-choice` is on. "auto" returns no spec:
    the model is free to answer in text."""
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
        if parser is not None:
            return None, ToolMode(parser=parser)
        raise InvalidArgument("tool_choice", '"auto" needs a parser for the model\'s own tool-call format '
                                             '(the server\'s --enable-auto-tool-choice '
                                             '--tool-call-parser, which are off); use "required" or name a function')
    if choice == "required":
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for name, params in functions.items()]}
        schema = {"type": "array", "items": items, "minItems": 1}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return StructuredSpec("json_schema", json.dumps(schema)), ToolMode()
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InvalidArgument("tool_choice", 'must be "none", "auto", "required" or {"type": "function", '
                                             '"function": {"name": ...}}')
    if name not in functions:
        raise InvalidArgument("tool_choice", f"names {name!r}, which is not one of the tools")
    return StructuredSpec("json_schema", json.dumps(functions[name])), ToolMode(named=name)


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
