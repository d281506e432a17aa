"""A request inside the engine: its tokens, its KV blocks, how much of it is computed."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from workers.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    ERROR = "error"  # the engine failed on this request alone (its own data); the others go on


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt + generated tokens. KV for the first `num_computed_tokens` is in `block_table`.

    Prefill, chunked prefill, decode and recompute after preemption are one thing: compute the
    tokens [num_computed_tokens, num_tokens); when that reaches the end, sample the next one.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # keys of the full, computed blocks (block_keys)
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # Counters the tests and metrics read.
    num_prefix_cached_tokens: int = 0  # prompt tokens served from the prefix cache (last admission)
    num_computed_prefill_tokens: int = 0  # prompt tokens actually run through the model, all admissions
    num_preemptions: int = 0
    # Tokens the prefix cache held for it when it arrived: its queued prefill is counted without them.
    expected_cached_tokens: int = 0
    # Sampling seed for unseeded requests, fixed at admission so a recompute draws the same.
    seed: int = 0
    # Its grammar's matcher (SamplingParams.structured; workers/engine/structured.py), rank 0's.
    matcher: object = None
    # prompt + output, kept as one list so the per-token paths (detokenizer, hashing) copy nothing.
    _tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tokens = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output, not a copy: read it, never change it."""
        return self._tokens

    def token_at(self, i: int) -> int:
        return self._tokens[i]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._tokens.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preempted: blocks were returned; prompt + outputs so far will be prefilled again."""
        self.block_table, self.block_hashes = [], []
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
