"""One place that turns a request into checked prompt ids and SamplingParams.

Every problem raises InvalidArgument naming the field (the servicers turn it into
INVALID_ARGUMENT), or NotFound for an unknown model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from workers.engine.sampling_params import SamplingParams
from workers.errors import ConfigError

MAX_PROMPT_CHARS = 1_000_000
MAX_REQUEST_ID_CHARS = 256


class InvalidArgument(ConfigError):
    """A request's field is out of range (the frontend's checks; the engine's are ConfigErrors too)."""


class NotFound(Exception):
    pass


@dataclass(slots=True)
class ModelLimits:
    name: str
    vocab_size: int
    max_model_len: int


def check_model(requested: str, served: str) -> None:
    if requested and requested != served:
        raise NotFound(f"model {requested!r} is not served here; this server serves {served!r}")


def checked_params(params: SamplingParams, prefix: str, limits: ModelLimits) -> SamplingParams:
    try:
        return params.validate(limits.vocab_size)
    except ConfigError as e:
        raise InvalidArgument(f"{prefix}{e.field}", e.message) from None


def finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value}")
    return value


def check_prompt_ids(ids: list[int], max_tokens: int, limits: ModelLimits, field: str = "prompt") -> list[int]:
    if not ids:
        raise InvalidArgument(field, "is empty")
    if len(ids) >= limits.max_model_len:  # before the scan below: a list may hold millions of ids
        raise InvalidArgument(field, f"{len(ids)} tokens; the context holds {limits.max_model_len}")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidArgument(field, f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    if len(ids) + max_tokens > limits.max_model_len:
        raise InvalidArgument("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                            f"the context of {limits.max_model_len} tokens")
    return ids


def check_request_id(request_id: str, field: str = "request_id") -> str | None:
    """A client's request id (echoed in replies and logs), or None for a server-made one."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(field, f"{len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        raise InvalidArgument(field, "must be printable text")
    return request_id or None
