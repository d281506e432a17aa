"""Speculative decoding: proposals that the target model verifies in the step it would run anyway.

At batch 1 a decode step reads every weight to produce one token. A decoding sequence with K
proposed tokens is scheduled as a (K+1)-token chunk instead (its last token and the proposals,
attending batched with the decoding sequences: workers/paged_cache.py), and every one of those K+1
positions samples. Row j is the target's next token given the prompt, the output and proposals[:j];
the engine keeps rows 0..a, where a is the first row whose token differs from proposal a
(workers/engine/core.py): each kept row's prefix is exactly what the target generated, so the
output is token for token the output without speculation.

Why this is the rejection sampler for these proposers: both propose deterministically (a lookup,
or the draft's argmax), so the draft distribution q is one-hot at the proposal x. Leviathan et al.
(2023) accept x with probability min(1, p(x) / q(x)) = p(x) and otherwise draw from
norm(max(0, p - q)) = p without x. Row j's token is drawn from p with the seeded exponential race
of the sampler (token i from (seed, i)); it equals x with probability p(x), and given that it
does not, it is distributed as p without x. Accepting "row j drew the proposal" is that rejection
sampler, with the one difference that a seeded request's text does not depend on the proposals,
the batch or the replica, as without speculation.

Proposers (vLLM's `--speculative-config` JSON, `method`):
- `ngram`: prompt lookup (Saxena 2023; vLLM's ngram): the longest suffix of the sequence, between
  `prompt_lookup_max` and `prompt_lookup_min` tokens, that occurred before; the tokens that followed
  its latest earlier occurrence are the proposal. An index of n-gram -> latest end position grows
  with the sequence, so a lookup costs O(max - min), not a scan of the context.
- `draft_model`: a smaller model with the same vocabulary (workers/engine/draft.py).

Speculation must never cost much where it does not pay:
- each step, it speculates only where it is expected to pay on this machine: the step's rows are
  priced by what decode steps of that many rows measured on this engine (workers/engine/
  step_costs.py), each request's proposals by its acceptance so far, and the number of tokens
  proposed (and to which sequences) is the one with the most expected tokens per second, none
  if that is plain decoding. A 5-row verify step costs 1.1x a one-row step with the int kernels
  fed bf16 and 2.4x in fp32 on the same machine, so a proposal accepted 9% of the time pays in
  the first and costs 23% in the second (docs/benchmarks.md): no fixed rule holds for both;
- per request, a request whose proposals keep being rejected stops being proposed to for a while
  (`backoff_steps`, doubling each time it happens again), which also spares its lookups;
- `max_batch` bounds the decoding sequences of a step that speculates, for a deployment that wants
  a fixed bound; by default there is none, the cost rule judges each batch (a large batch is
  compute-bound, where K extra rows per sequence cost nearly K times more, and the measured
  costs say so).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from workers.engine.sampler import SeqRow
from workers.engine.step_costs import CostTable, StepCosts
from workers.errors import ConfigError

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
# Speculate while a step decodes at most this many sequences: by default no bound, the cost rule
# decides. It was 4 while a verify attended sequence by sequence as a prefill chunk (fp32, n-gram at
# ~80% acceptance: 1.47x at 2 sequences, 0.65x at 8); since verifies attend batched with the
# decodes (workers/paged_cache.py), forced speculation gives 1.40x at 16 sequences and 1.34x at 64
# in fp32, the cost rule 1.21x and 1.23x (docs/benchmarks.md, 2026-12-05).
DEFAULT_MAX_BATCH = 1 << 16
# Acceptance (accepted / proposed) below which a request's proposals are paused, judged over at
# least `MIN_PROPOSED` proposed tokens since its last pause.
DEFAULT_MIN_ACCEPTANCE = 0.2
MIN_PROPOSED = 16
DEFAULT_BACKOFF_STEPS = 32
PRIOR_DECAY = 0.995  # per verify: the engine-wide acceptance a new request starts from spans ~200


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """`--speculative-config` (vLLM's keys)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None  # draft_model: a folder, a GGUF or a built-in name, as --model takes
    quantization: str = "none"  # draft_model: the draft's weights (none, int8, int4), as --quantization
    max_batch: int = DEFAULT_MAX_BATCH
    min_acceptance: float = DEFAULT_MIN_ACCEPTANCE
    backoff_steps: int = DEFAULT_BACKOFF_STEPS
    # Speculate only where the step's measured cost says it pays (Speculator.worth); false proposes
    # wherever a proposal is found within max_batch and the pause rule (equality tests, and a
    # benchmark that measures speculation forced on).
    adaptive: bool = True

    KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "quantization",
            "max_batch", "min_acceptance", "backoff_steps", "adaptive")

    @classmethod
    def parse(cls, text: str | None, flag: str = "speculative-config") -> "SpeculativeConfig | None":
        """The flag's JSON; None for no speculation. Errors name `flag.key`."""
        if text is None or not text.strip():
            return None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(flag, f"is not JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(raw, dict):
            raise ConfigError(flag, f"must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"{flag}.{unknown[0]}", f"is not a key; the keys are {', '.join(cls.KEYS)}")
        if "method" not in raw:
            raise ConfigError(f"{flag}.method", f"is required: one of {', '.join(METHODS)}")
        if "num_speculative_tokens" not in raw:
            raise ConfigError(f"{flag}.num_speculative_tokens", "is required")
        return cls(**raw).validate(flag)

    def validate(self, flag: str = "speculative-config") -> "SpeculativeConfig":
        def integer(key: str, lo: int, hi: int) -> None:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"{flag}.{key}", f"must be an integer in [{lo}, {hi}], got {v!r}")

        if self.method not in METHODS:
            raise ConfigError(f"{flag}.method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        integer("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        integer("max_batch", 1, 1 << 16)
        integer("backoff_steps", 0, 1 << 20)
        integer("prompt_lookup_min", 1, 64)
        integer("prompt_lookup_max", 1, 64)
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ConfigError(f"{flag}.prompt_lookup_max", f"({self.prompt_lookup_max}) is below "
                                                           f"prompt_lookup_min ({self.prompt_lookup_min})")
        a = self.min_acceptance
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ConfigError(f"{flag}.min_acceptance", f"must be a number in [0, 1], got {a!r}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise ConfigError(f"{flag}.model", "draft_model needs the draft's folder, GGUF or name")
        elif self.model is not None:
            raise ConfigError(f"{flag}.model", f"only draft_model takes a model, not {self.method}")
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"{flag}.adaptive", f"must be true or false, got {self.adaptive!r}")
        if self.quantization not in ("none", "int8", "int4"):
            raise ConfigError(f"{flag}.quantization", f"{self.quantization!r} is not one of none, int8, int4")
        return self


class SpecRow(SeqRow):
    """What the sampler reads of a sequence, for the verify row after proposals[:j]: its token
    index (the seeded draw), penalties and logprobs see the proposals as output."""

    __slots__ = ("spec",)

    def __init__(self, seq, spec: list[int]):
        self.seq, self.spec = seq, spec

    @property
    def seed(self) -> int:
        return self.seq.seed

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.spec

    @property
    def all_token_ids(self) -> list[int]:
        return self.seq.all_token_ids + self.spec


class NgramIndex:
    """n-gram (prompt_lookup_min..max tokens) -> end position of its latest occurrence, for one
    sequence; it lags the sequence by one position so that the suffix never finds itself."""

    __slots__ = ("lo", "hi", "latest", "indexed")

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix."""
        n = len(tokens)
        latest, lo, hi = self.latest, self.lo, self.hi
        for end in range(self.indexed, n - 1):  # n-grams ending at end (inclusive)
            for size in range(lo, min(hi, end + 1) + 1):
                latest[tuple(tokens[end - size + 1:end + 1])] = end
        self.indexed = max(self.indexed, n - 1)
        for size in range(min(hi, n - 1), lo - 1, -1):
            end = latest.get(tuple(tokens[n - size:]))
            if end is not None:
                return tokens[end + 1:end + 1 + k]
        return []


@dataclass(slots=True)
class SpecTrack:
    """One request's acceptance, for the pause rule, the cost rule and the metrics."""

    proposed: int = 0  # since the last pause
    accepted: int = 0
    paused_until: int = 0  # engine step
    pauses: int = 0
    index: NgramIndex | None = None
    # For the cost rule: proposed tokens accepted, and verify steps that rejected one (each verify
    # accepts a prefix of its proposals: hits / (hits + misses) estimates the chance that a proposed
    # token is accepted given the ones before it were). Halved every `backoff_steps` steps the rule
    # declines the request, so a text that turns repetitive later is tried again.
    hits: float = 0.0
    misses: float = 0.0
    declined: int = 0


@dataclass(slots=True)
class SpecStats:
    """Prometheus' spec_decode_* counters (vLLM's names) and what the bench reports."""

    num_drafts: int = 0  # sequence-steps that verified a proposal
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_paused: int = 0  # times a request's proposals were paused for low acceptance
    num_declined: int = 0  # sequence-steps the cost rule left unproposed (not expected to pay)


class NgramProposer:
    """Prompt-lookup proposals for the running sequences of one engine."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, seqs, tracks: dict[str, SpecTrack], budget) -> dict[str, list[int]]:
        out = {}
        for s in seqs:
            k = budget(s)
            if k <= 0:
                continue
            t = tracks[s.request_id]
            if t.index is None:
                t.index = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
            spec = t.index.propose(s.all_token_ids, k)
            if spec:
                out[s.request_id] = spec
        return out

    def forget(self, request_id: str) -> None:
        pass


class Speculator:
    """Rank 0's proposals for one engine: which sequences speculate this step, how many tokens,
    and what the verify step accepted (the pause rule and the counters)."""

    def __init__(self, config: SpeculativeConfig, proposer):
        self.config = config
        self.proposer = proposer
        self.tracks: dict[str, SpecTrack] = {}
        self.stats = SpecStats()
        self.step_no = 0
        self.costs = StepCosts()
        self._hits = self._misses = 0.0  # the engine's, decayed: the prior of a request's acceptance

    def propose(self, running, max_model_len: int) -> dict[str, list[int]]:
        """request id -> proposal, for the running sequences that decode this step."""
        self.step_no += 1
        decoding = [s for s in running if s.num_computed_tokens == s.num_tokens - 1]
        if not decoding or len(decoding) > self.config.max_batch:
            return {}
        k_max = self.config.num_speculative_tokens
        for s in decoding:
            self.tracks.setdefault(s.request_id, SpecTrack())

        room = {}
        for s in decoding:
            if self.tracks[s.request_id].paused_until > self.step_no:
                continue
            # Nothing past max_tokens or the context is worth verifying: the last row samples
            # the token after the proposals.
            left = min(s.params.max_tokens - len(s.output_token_ids), max_model_len - s.num_tokens) - 1
            if left > 0:
                room[s.request_id] = min(k_max, left)
        if not room:
            return {}
        ks = self.worth(len(decoding), room, self.costs.table(self.step_no)) if self.config.adaptive else room
        if not ks:
            return {}
        t = time.perf_counter()
        out = self.proposer.propose(decoding, self.tracks, lambda s: ks.get(s.request_id, 0))
        self.costs.record_proposal(max(ks.values()), time.perf_counter() - t, self.step_no)
        return out

    def worth(self, batch: int, room: dict[str, int], costs: CostTable) -> dict[str, int]:
        """request id -> tokens to propose this step, among `room` (request id -> most worth
        verifying) for a step decoding `batch` sequences: the choice with the most expected tokens
        per second, where a request's proposal of k tokens is expected to add p + p^2 + ... + p^k
        accepted tokens (p its acceptance estimate) and the step costs what decode steps of its rows
        measured (plus the proposer's forwards). Everything in `room` while the cost of that step
        or of plain decoding is not measured yet: a step that speculates fully measures the first,
        one without proposals the second, and everything between is interpolated."""
        full = batch + sum(room.values())
        base, top = costs.step(batch), costs.step(full)
        if base is None or top is None:
            return dict(room)
        # A request's estimate leans on the engine's recent acceptance until it has its own.
        p0 = (self._hits + 1.0) / (self._hits + self._misses + 2.0)
        p_of = {rid: (self.tracks[rid].hits + 2.0 * p0) / (self.tracks[rid].hits + self.tracks[rid].misses + 2.0)
                for rid in room}
        ranked = sorted(room, key=lambda rid: -p_of[rid])
        best, best_rate = {}, batch / base
        for k in range(1, max(room.values()) + 1):
            rows = tokens = batch
            chosen = {}
            for rid in ranked:
                kk, p = min(k, room[rid]), p_of[rid]
                chosen[rid] = kk
                rows += kk
                tokens += kk if p >= 1.0 else p * (1.0 - p ** kk) / (1.0 - p)
                rate = tokens / (costs.step(rows) + k * costs.propose_per_token)
                if rate > best_rate:
                    best, best_rate = dict(chosen), rate
        for rid in room.keys() - best.keys():
            t = self.tracks[rid]
            t.declined += 1
            self.stats.num_declined += 1
            if self.config.backoff_steps and t.declined % self.config.backoff_steps == 0:
                t.hits, t.misses = t.hits / 2, t.misses / 2
        return best

    def timed(self, rows: int, seconds: float) -> None:
        """A step that decoded only (proposals verified or not) took `seconds` for `rows` query rows."""
        self.costs.record(rows, seconds, self.step_no)

    def verified(self, request_id: str, proposed: int, accepted: int) -> None:
        st, t = self.stats, self.tracks.get(request_id)
        st.num_drafts += 1
        st.num_draft_tokens += proposed
        st.num_accepted_tokens += accepted
        # The engine's acceptance over its last few hundred verifies (older ones fade).
        self._hits = self._hits * PRIOR_DECAY + accepted
        self._misses = self._misses * PRIOR_DECAY + (accepted < proposed)
        if t is None:
            return
        t.hits += accepted
        t.misses += accepted < proposed
        t.proposed += proposed
        t.accepted += accepted
        if t.proposed >= MIN_PROPOSED and t.accepted < self.config.min_acceptance * t.proposed:
            t.pauses += 1
            t.paused_until = self.step_no + self.config.backoff_steps * (1 << min(t.pauses - 1, 10))
            t.proposed = t.accepted = 0
            st.num_paused += 1

    def forget(self, request_id: str) -> None:
        self.tracks.pop(request_id, None)
        self.proposer.forget(request_id)
