"""Per-request sampling parameters, validated in one place: a bad value names its field."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from workers.engine.structured import StructuredSpec
from workers.errors import ConfigError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_CACHE_SALT_CHARS = 256
# Bounds that hold before the model is known (a request's own checks add the vocabulary and the
# context): every integer must fit the kernels' int64 index tensors and the int32 counters.
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_TOP_K = 2**31 - 1
# Below this a temperature is greedy (vLLM's rule): dividing logits by it would overflow float32
# and make the softmax NaN.
GREEDY_TEMPERATURE = 1e-5
# Beyond these a penalty overflows float32 logits (x / 1e-300 is inf) and the softmax goes NaN.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2


class SamplingError(ConfigError):
    """A sampling parameter is out of range."""


def check_text(name: str, text: str, error: type = ConfigError) -> str:
    """`text` as valid Unicode: JSON's "\\ud800" and protobuf's Python strings can carry lone
    surrogates, which no tokenizer, hash or UTF-8 encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(name, f"is not valid UTF-8 text (a lone surrogate {text[e.start]!r} at character {e.start})") \
            from None
    return text


@dataclass(slots=True)
class SamplingParams:
    """What to sample and when to stop. temperature 0 is greedy; top_k 0 or -1 disables top-k."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # A list as given; `validate` makes it a frozenset (each generated token is looked up in it).
    stop_token_ids: list[int] | frozenset[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs of each chosen token (0: only the chosen one)
    # Top-n logprobs of each prompt token after the first (0: only the prompt token's own), from
    # the prefill's logits; such a request does not read the prefix cache (its positions must run).
    prompt_logprobs: int | None = None
    # The output held to a JSON schema, JSON, a regex, a choice or a grammar (workers/engine/structured.py).
    structured: StructuredSpec | None = None
    skip_special_tokens: bool = True
    # Not a sampling knob, but it travels with them: requests with different salts never share
    # prefix-cache blocks (a tenant's cached prompt cannot show in another's time to first token).
    cache_salt: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def finite(name: str, v) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(name, f"must be a finite number, got {v!r}")
            return float(v)

        def integer(name: str, v) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise SamplingError(name, f"must be an integer, got {v!r}")
            return v

        if not 1 <= integer("max_tokens", self.max_tokens) <= MAX_TOKENS_LIMIT:
            raise SamplingError("max_tokens", f"must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if finite("temperature", self.temperature) < 0:
            raise SamplingError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < finite("top_p", self.top_p) <= 1:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")
        top_k_max = MAX_TOP_K if vocab_size is None else vocab_size
        if not -1 <= integer("top_k", self.top_k) <= top_k_max:
            raise SamplingError("top_k", f"must be -1 or 0 (disabled), or at most the vocabulary size "
                                         f"{top_k_max}, got {self.top_k}")
        if not 0 <= finite("min_p", self.min_p) <= 1:
            raise SamplingError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not MIN_REPETITION_PENALTY <= finite("repetition_penalty", self.repetition_penalty) \
                <= MAX_REPETITION_PENALTY:
            raise SamplingError("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, "
                                                      f"{MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name, getattr(self, name)) <= 2:
                raise SamplingError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= integer("seed", self.seed) < 2**63:
            raise SamplingError("seed", f"must be in [0, 2^63), got {self.seed}")
        if not isinstance(self.stop, list):
            raise SamplingError("stop", "must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", "must be a list of non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            # the detokenizer holds back up to the longest stop string's length of text
            raise SamplingError("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters")
        for i, s in enumerate(self.stop):
            check_text(f"stop[{i}]", s, SamplingError)
        if not isinstance(self.stop_token_ids, (list, frozenset)):
            raise SamplingError("stop_token_ids", "must be a list of token ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            if integer("stop_token_ids", t) < 0 or (vocab_size is not None and t >= vocab_size):
                raise SamplingError("stop_token_ids", f"{t} is outside the vocabulary [0, {vocab_size})")
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or len(self.cache_salt) > MAX_CACHE_SALT_CHARS):
            raise SamplingError("cache_salt", f"must be text of at most {MAX_CACHE_SALT_CHARS} characters")
        if self.cache_salt is not None:
            check_text("cache_salt", self.cache_salt, SamplingError)
        if self.logprobs is not None and not 0 <= integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise SamplingError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredSpec):
                raise SamplingError("structured_outputs", "must be a StructuredSpec")
            self.structured.validate()
        if self.prompt_logprobs is not None and not 0 <= integer("prompt_logprobs", self.prompt_logprobs) \
                <= MAX_LOGPROBS:
            raise SamplingError("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        return self
