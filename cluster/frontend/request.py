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
    # max_tokens absent: generate up to the rest of the context once the prompt is tokenized
    # (the OpenAI API's default); params.max_tokens is then filled in by the request path.
    fill_max_tokens: bool = False
