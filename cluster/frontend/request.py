"""The one protocol-neutral request every API hands the request path (`Frontend.stream`).

Each API (tpserve.v1, KServe, OpenAI) maps its wire format onto this and nothing else: the prompt
as sent (checked by `PromptEncoder.check`, tokenized and bounded by `check_prompt_ids` in the
request path), sampling (checked by `validate.build_params`; the cache salt travels inside it), the
client's id and deadline. The request path never reads a wire message.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.frontend.tokenize import PromptInput
from workers.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class FrontendRequest:
    prompt: PromptInput
    params: SamplingParams
    request_id: str | None = None  # None: the path makes one
    deadline: float | None = None  # time.monotonic; bounds how long a resume may wait
    # max_tokens absent (the OpenAI API's defaults): params.max_tokens is a default the request
    # path lowers to the rest of the context once the prompt is tokenized (completions: 16, as
    # OpenAI and vLLM; chat: the whole context, so the answer ends where the context does).
    fill_max_tokens: bool = False
