"""`tool_choice: "auto"`: the model's own tool-call format (hermes, llama3_json) parsed out of its
answer, whole and streamed; refused without the server's flags. The served path is in
test_openai.py (the shared cluster runs with --enable-auto-tool-choice --tool-call-parser hermes)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cluster.frontend.openai_reply import Choice, Reply
from cluster.frontend.openai_tools import ToolMode, tool_spec
from cluster.frontend.tool_parsers import HermesParser, Llama3JsonParser
from cluster.frontend.validate import InvalidArgument

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def calls_of(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_parses_calls_after_content_and_returns_anything_else_as_content():
    p = HermesParser()
    content, calls = p.parse('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                             '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert content == "Let me look.\n"
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    # A call cut before its end tag still parses when its JSON is whole (as vLLM reads it).
    assert calls_of(p.parse('<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}')[1]) == [("f", {"x": [1, 2]})]
    assert p.parse('<tool_call>{"name": "f", "arguments": {"x": }</tool_call>') == \
        ('<tool_call>{"name": "f", "arguments": {"x": }</tool_call>', None)  # invalid JSON: text back
    assert p.parse('<tool_call>{"arguments": {}}</tool_call>')[1] is None  # no name
    assert p.parse("It is sunny.") == ("It is sunny.", None)


def test_llama3_json_parses_one_or_several_calls_and_leaves_text_alone():
    p = Llama3JsonParser()
    assert calls_of(p.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')[1]) == \
        [("get_weather", {"city": "Oslo"})]
    content, calls = p.parse('<|python_tag|>{"name": "a", "arguments": {"k": 1}}; {"name": "b", "parameters": {}}')
    assert content is None and calls_of(calls) == [("a", {"k": 1}), ("b", {})]
    assert p.parse("Oslo is cold.") == ("Oslo is cold.", None)
    assert p.parse('{"name": "a", "parameters": {') == ('{"name": "a", "parameters": {', None)
    assert p.parse('{"city": "Oslo"}')[1] is None  # JSON, but not a call


@pytest.mark.parametrize("parser,text,held", [
    (HermesParser(), "Sure", 4), (HermesParser(), "Sure <tool", 5), (HermesParser(), "Sure <", 5),
    (HermesParser(), "a <tool_call>{", 2), (HermesParser(), "a <b>", 5),
    (Llama3JsonParser(), "  ", 0), (Llama3JsonParser(), ' {"na', 0), (Llama3JsonParser(), "<|pyt", 0),
    (Llama3JsonParser(), "Sure", 4),
])
def test_streaming_holds_back_only_what_may_start_a_call(parser, text, held):
    assert parser.held_from(text) == held


def stream(parser, pieces, finish="stop"):
    """Drive Reply's streamed tool deltas with `pieces` of model text, as the engine's deltas come."""
    reply = Reply(SimpleNamespace(name="m"), "r", True, SimpleNamespace(), [Choice(0)], 1, tools=ToolMode(parser=parser))
    choice, deltas = reply.choices[0], []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        choice.text += piece
        choice.finish_reason = finish if last else None
        deltas.append(reply._tool_delta(choice, piece, i == 0, choice.finish_reason))
    return deltas


def test_streamed_auto_sends_content_as_it_comes_and_the_calls_at_the_end():
    deltas = stream(HermesParser(), ["I will check", " the weather. <tool", '_call>{"name": "get_weather", ',
                                     '"arguments": {"city": "Rome"}}</tool_call>'])
    content = "".join(d.get("content") or "" for d, _ in deltas)
    assert content == "I will check the weather. "
    assert deltas[1][0]["content"] == " the weather. "  # "<tool" held back, not sent as text
    (last, finish) = deltas[-1]
    assert finish == "tool_calls" and calls_of(last["tool_calls"]) == [("get_weather", {"city": "Rome"})]
    assert last["tool_calls"][0]["index"] == 0
    assert all("tool_calls" not in d for d, _ in deltas[:-1]) and all(f is None for _, f in deltas[:-1])


def test_streamed_auto_text_that_only_looked_like_a_call_arrives_whole_as_content():
    deltas = stream(HermesParser(), ["Use <tool", "s> wisely"])
    assert "".join(d.get("content") or "" for d, _ in deltas) == "Use <tools> wisely"
    assert deltas[-1][1] == "stop" and all("tool_calls" not in d for d, _ in deltas)
    # Cut short by max_tokens inside a call: the text, finish "length", no calls.
    deltas = stream(Llama3JsonParser(), ['{"name": "f", ', '"parameters": {"a"'], finish="length")
    assert "".join(d.get("content") or "" for d, _ in deltas) == '{"name": "f", "parameters": {"a"'
    assert deltas[-1][1] == "length"


def test_auto_needs_the_servers_parser_and_leaves_the_output_unconstrained():
    body = SimpleNamespace(tools=TOOLS, tool_choice="auto", parallel_tool_calls=None)
    with pytest.raises(InvalidArgument) as info:
        tool_spec(body)
    assert info.value.field == "tool_choice" and "--enable-auto-tool-choice" in info.value.message
    body.tool_choice = None  # auto is the default when tools are given
    with pytest.raises(InvalidArgument):
        tool_spec(body)
    spec, mode = tool_spec(body, HermesParser())
    assert spec is None and isinstance(mode.parser, HermesParser)


def test_serve_flags_for_auto_are_checked_together():
    from cluster.serve import ServeOptions
    from workers.errors import ConfigError

    for opts, flag in ((ServeOptions(enable_auto_tool_choice=True), "tool-call-parser"),
                       (ServeOptions(tool_call_parser="hermes"), "enable-auto-tool-choice"),
                       (ServeOptions(enable_auto_tool_choice=True, tool_call_parser="xml"), "tool-call-parser")):
        with pytest.raises(ConfigError) as info:
            opts.validate()
        assert info.value.field == flag
    ServeOptions(enable_auto_tool_choice=True, tool_call_parser="llama3_json").validate()
