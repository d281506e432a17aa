"""The OpenAI API's request bodies as Pydantic models: they check each field's type and name it
in the 400 (`http_body.decode` runs them)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RequestBody(BaseModel):
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
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs and top-n
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens in the text
    # Structured outputs: OpenAI's response_format, and vLLM's structured_outputs (and its older
    # guided_* fields); `openai_structured` maps them onto one StructuredSpec.
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


class CompletionBody(RequestBody):
    # One prompt (text or token ids) or a batch of them, one choice each (x n).
    prompt: str | list[int] | list[str] | list[list[int]]
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
    tool_calls: list[dict] | None = None  # an assistant's earlier calls, back through the template
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a completion prompt or chat messages (the chat template applied)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeBody(BaseModel):
    """vLLM's /detokenize."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class ChatBody(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
