"""Structured outputs: a request's output held to a JSON schema, any JSON, a regex, one of a list of
strings, or an EBNF grammar, by token masks on rank 0's sampler.

The grammar engine is xgrammar (vLLM's and SGLang's default): it compiles a grammar against the
tokenizer's vocabulary once (cached by spec), and a per-request `GrammarMatcher` then fills the
next token's allowed set as a bitmask in microseconds, applied to the constrained rows of a batch
only. Compiling runs on a small thread pool, off the engine thread: a request waits for its
grammar outside the scheduler, and others keep stepping meanwhile.
"""
from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from workers.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 200_000  # a schema, regex or grammar; compiling is linear-ish in it
CACHE_SIZE = 256  # compiled grammars kept (by spec)


class StructuredError(ConfigError):
    """A spec that cannot be compiled (the field names where the request put it)."""


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """What the output must match. `value`: the schema as JSON text (json_schema), the regex, a
    JSON list of the allowed strings (choice), or the EBNF grammar; empty for json_object."""

    kind: str
    value: str = ""

    def validate(self, field: str = "structured_outputs") -> "StructuredSpec":
        if self.kind not in KINDS:
            raise StructuredError(field, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.value, str) or len(self.value) > MAX_SPEC_CHARS:
            raise StructuredError(field, f"must be text of at most {MAX_SPEC_CHARS:,} characters")
        if self.kind != "json_object" and not self.value:
            raise StructuredError(field, f"{self.kind} is empty")
        if self.kind == "choice":
            try:
                choices = json.loads(self.value)
            except ValueError:
                choices = None
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                raise StructuredError(field, "choice must be a non-empty list of non-empty strings")
        return self

    def grammar(self):
        """The xgrammar Grammar (no tokenizer needed): parses the spec, so a bad one fails here."""
        import xgrammar as xgr

        if self.kind == "json_schema":
            return xgr.Grammar.from_json_schema(self.value, any_whitespace=False)
        if self.kind == "json_object":  # OpenAI's JSON mode answers an object (xgrammar's builtin: any value)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if self.kind == "regex":
            return xgr.Grammar.from_regex(self.value)
        if self.kind == "choice":
            return xgr.Grammar.from_regex("|".join(_regex_literal(c) for c in json.loads(self.value)))
        return xgr.Grammar.from_ebnf(self.value)


def _regex_literal(text: str) -> str:
    """`text` as a regex matching exactly it (xgrammar's regex syntax is ECMAScript's)."""
    special = set(r"\^$.|?*+()[]{}/-")
    return "(" + "".join("\\" + ch if ch in special else ch for ch in text) + ")"


def check_spec(spec: StructuredSpec, field: str) -> None:
    """Frontend-side: refuse a spec that does not parse, naming `field` (no tokenizer needed)."""
    spec.validate(field)
    try:
        spec.grammar()
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with the parser's message
        raise StructuredError(field, f"cannot be compiled: {str(e).strip().splitlines()[0][:300]}") from None


class Grammars:
    """Rank 0's compiled grammars (a cache by spec) and the matchers of its requests."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], threads: int = 1):
        import xgrammar as xgr

        self.xgr = xgr
        if not hasattr(tokenizer, "backend_tokenizer"):  # the engine's `tokenizers.Tokenizer`
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        # The model's vocabulary size (logits rows may be padded past the tokenizer's), its stop tokens.
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max(1, threads), cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpserve-grammar")
        self._cache: dict[StructuredSpec, Future] = {}
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec) -> Future:
        """The compiled grammar of `spec`, compiling it off this thread once."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = self._pool.submit(self._compile, spec)
                self._cache[spec] = fut
                while len(self._cache) > CACHE_SIZE:
                    self._cache.pop(next(iter(self._cache)))
            else:  # most recently used last
                self._cache[spec] = self._cache.pop(spec)
            return fut

    def _compile(self, spec: StructuredSpec):
        try:
            return self.compiler.compile_grammar(spec.grammar())
        except Exception as e:
            raise StructuredError("structured_outputs", f"cannot be compiled: {str(e).strip()[:300]}") from None

    def matcher(self, compiled, output_prefix: list[int]):
        """A fresh matcher, advanced over tokens the request already generated (a resume)."""
        m = self.xgr.GrammarMatcher(compiled)
        for t in output_prefix:
            if not m.accept_token(t):
                raise StructuredError("output_prefix", f"token {t} does not match the grammar")
        return m

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_grammars(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """In place: every token a row's grammar does not allow next gets -inf (the rows of a batch
    that are constrained, and only those)."""
    import xgrammar as xgr

    mask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
    for i, m in enumerate(matchers):
        m.fill_next_token_bitmask(mask, i)
    sub = logits[rows].float()
    xgr.apply_token_bitmask_inplace(sub, mask.to(logits.device))
    logits[rows] = sub.to(logits.dtype)
