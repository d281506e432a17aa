"""What the engine emits per step: one delta per request that advanced (batched per step)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    """New tokens and text of one request since its previous output; `finished` on the last one."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    logprobs: list[dict] | None = None  # per new token: {"token_id", "logprob", "top": [(id, logprob)]}
    # Once, with the first new token: per prompt token the same dict, None for the first (nothing
    # precedes it); only for requests with SamplingParams.prompt_logprobs.
    prompt_logprobs: list[dict | None] | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0  # total so far
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0  # prompt tokens run through the model (prefix-cache misses, recompute)
    num_preemptions: int = 0
    error: str | None = None  # typed error message when finish_reason == "error"
    error_field: str | None = None
    replica_lost: bool = False  # the error is the replica's, not the request's: it may be resumed elsewhere
    # ... and the replica failed (its engine raised) rather than vanished (a killed process, a lost
    # node): the frontend's dead-letter rule counts these, since the request may be the cause.
    replica_failed: bool = False
    request_failed: bool = False  # the engine failed on this request alone: not to be retried


@dataclass(slots=True)
class EngineStats:
    """Counters a scheduler exposes; the tests and the metrics read them."""

    steps: int = 0
    running: int = 0
    waiting: int = 0
    num_blocks: int = 0
    free_blocks: int = 0
    max_seqs_in_step: int = 0
    mixed_steps: int = 0  # steps that ran prefill and decode together
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0  # requests the engine failed on alone (RequestFailed)
    # Speculative decoding (workers/engine/speculative.py), vLLM's spec_decode_* counters.
    spec_drafts: int = 0  # sequence-steps that verified proposals
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_paused: int = 0  # times a request's proposals were paused for low acceptance
    spec_declined: int = 0  # sequence-steps left unproposed because speculating was not expected to pay
