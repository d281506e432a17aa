"""One place that turns a request into checked prompt ids and SamplingParams.

Each API (tpserve.v1, KServe, OpenAI) only maps its wire format onto SamplingParams' field names;
`build_params` checks them all the same way, `check_model` applies the one rule for model names,
`check_prompt_ids` the one rule for a tokenized prompt. Every problem raises InvalidArgument
naming the field as that API spells it (INVALID_ARGUMENT / 400), or NotFound for an unknown model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from workers.engine.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams
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


# Every sampling field a request may set, and its type: the names all three APIs map onto.
SAMPLING_FIELDS: dict[str, type] = {
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float, "seed": int,
    "stop": list, "stop_token_ids": list, "ignore_eos": bool, "logprobs": int, "prompt_logprobs": int, "cache_salt": str}


def check_model(requested: str, served: str, required: bool) -> None:
    """The model a request names must be the one served. An empty name means the served model
    only where the API makes the field optional (tpserve.v1); KServe's model_name and OpenAI's
    `model` are required, so there an empty name is an unknown model."""
    if (requested or required) and requested != served:
        raise NotFound(f"model {requested!r} is not served here; this server serves {served!r}")


def build_params(values: Mapping[str, object], limits: ModelLimits, prefix: str = "",
                 names: Mapping[str, str] | None = None) -> SamplingParams:
    """SamplingParams from the fields a request set (SamplingParams' names; None: the default),
    checked the one way for every API: floats finite, id lists bounded before they are copied,
    then `SamplingParams.validate`. An error names the field as the API spells it: `names[field]`
    where given, else `prefix` + the field."""
    def wire(name: str) -> str:
        return (names or {}).get(name) or prefix + name

    p = SamplingParams()
    for name, value in values.items():
        if value is None:
            continue
        kind = SAMPLING_FIELDS[name]
        if kind is float:
            value = finite(wire(name), float(value))
        elif name == "stop_token_ids" and len(value) > MAX_STOP_TOKEN_IDS:  # before copying a million ids
            raise InvalidArgument(wire(name), f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}")
        elif kind is list:
            value = list(value)
        elif kind is int:
            value = int(value)
        setattr(p, name, value)
    try:
        return p.validate(limits.vocab_size)
    except ConfigError as e:
        raise InvalidArgument(wire(e.field), e.message) from None


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
