"""Rank 0's sampler: batched logits processing, then one draw per sequence.

Order (as in vLLM/HF): penalties on raw logits -> temperature -> top-k -> top-p -> min-p -> draw.
A seeded request's token i is drawn with a generator seeded by (seed, i), so its text does not
depend on what else is in the batch, on preemption, or on which replica resumes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workers import fused_ops
from workers.engine.sequence import Sequence

log = logging.getLogger(__name__)

_MASK = float("-inf")
_MAX_TEMPERATURE = 1e30


class SampleError(Exception):
    """Sampling one sequence's row failed; `request_id` names the request it belongs to."""

    def __init__(self, request_id: str, cause: BaseException):
        self.request_id, self.cause = request_id, cause
        super().__init__(f"sampling request {request_id} failed: {type(cause).__name__}: {cause}")


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token under the model's (unprocessed) distribution
    top_logprobs: list[tuple[int, float]] | None = None
    rank: int | None = None  # a scored prompt token's rank in its row (1: the most likely)


class SeqRow:
    """A logits row of a sequence other than its own next-token row (a verify row, a prompt row):
    the request and its parameters are the sequence's."""

    __slots__ = ("seq",)

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def params(self):
        return self.seq.params


class PromptRow(SeqRow):
    """A logits row that scores a prompt token instead of drawing one: the row at prompt position
    p gives the logprob of prompt token p + 1 and the top-n there (SamplingParams.prompt_logprobs)."""

    __slots__ = ("position", "target")

    def __init__(self, seq: Sequence, position: int, target: int):
        self.seq, self.position, self.target = seq, position, target


def score_prompt(logits: torch.Tensor, rows: list[PromptRow]) -> list[SampleResult]:
    """logits [R, V] at prompt positions -> each row's target logprob and top-n, unprocessed (no
    temperature or penalties: the model's distribution, as vLLM reports prompt logprobs)."""
    logprobs = logits.float().log_softmax(-1)
    targets = torch.tensor([r.target for r in rows], device=logits.device)
    at = logprobs.gather(1, targets.unsqueeze(1))
    ranks = ((logprobs > at).sum(-1) + 1).tolist()
    chosen = at.squeeze(1).tolist()
    width = max(r.params.prompt_logprobs for r in rows)
    top_vals, top_idx = logprobs.topk(width, dim=-1) if width else (None, None)
    out = []
    for i, r in enumerate(rows):
        n = r.params.prompt_logprobs
        top = list(zip(top_idx[i, :n].tolist(), top_vals[i, :n].tolist())) if n else []
        out.append(SampleResult(r.target, chosen[i], top, ranks[i]))
    return out


def score_and_sample(logits: torch.Tensor, rows: list) -> list[SampleResult | SampleError]:
    """One result per row: prompt rows (`PromptRow`) scored, the others sampled (`sample_each`)."""
    scored = [i for i, r in enumerate(rows) if isinstance(r, PromptRow)]
    if not scored:
        return sample_each(logits, rows)
    drawn = [i for i, r in enumerate(rows) if not isinstance(r, PromptRow)]
    results: list = [None] * len(rows)
    if drawn:
        for i, r in zip(drawn, sample_each(logits[drawn], [rows[i] for i in drawn])):
            results[i] = r
    try:
        for i, r in zip(scored, score_prompt(logits[scored], [rows[i] for i in scored])):
            results[i] = r
    except Exception as e:  # scoring is per request: a failure costs only the requests that asked
        log.exception("scoring %d prompt rows failed", len(scored))
        for i in scored:
            results[i] = SampleError(rows[i].request_id, e)
    return results


def token_seed(seed: int, index: int) -> int:
    """A 63-bit seed for token `index` of a request seeded with `seed` (splitmix64 mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition (HF): tokens seen in prompt or output are divided/multiplied.
    Presence/frequency (OpenAI): subtracted per output token seen / per occurrence."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties:
            continue
        x = logits[row]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.long, device=x.device)
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=x.device)
            counts = torch.bincount(out, minlength=x.shape[0]).to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for the sampled (non-greedy) rows; returns probabilities."""
    dev = logits.device
    # validate() makes every temperature below GREEDY_TEMPERATURE greedy; the clamp keeps a huge
    # one finite in float32 (a float64 1e308 would become inf, and -inf / inf is NaN).
    temp = torch.tensor([min(s.params.temperature, _MAX_TEMPERATURE) for s in seqs], device=dev).unsqueeze(1)
    logits = logits / temp
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    vocab = logits.shape[-1]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=dev).unsqueeze(1)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        drop = ranks >= k
        probs = sorted_logits.masked_fill(drop, _MASK).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(-1) - probs
        drop |= before >= torch.tensor(top_p, device=dev).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, _MASK)
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if any(m > 0 for m in min_p):
        m = torch.tensor(min_p, device=dev).unsqueeze(1)
        probs = probs.masked_fill(probs < m * probs.max(-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_each(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult | SampleError]:
    """`sample`, but a row whose sampling raises gives a SampleError naming its request instead of
    failing the batch: one request's parameters never cost the others their step."""
    try:
        return sample(logits, seqs)
    except Exception:  # find the row: each one alone (rare, so the cost of B small calls is fine)
        log.exception("batched sampling failed; sampling its %d rows one by one", len(seqs))
    results: list[SampleResult | SampleError] = []
    for i, seq in enumerate(seqs):
        try:
            results.append(sample(logits[i:i + 1], [seq])[0])
        except Exception as e:
            results.append(SampleError(seq.request_id, e))
    return results


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
    """logits [B, V] in the model's dtype (rank 0's gathered logits) -> one SampleResult per
    sequence. Greedy rows take the argmax of the logits as they are (exact in any dtype); whatever
    computes with them (logprobs, penalties, grammars, temperature) works on a float32 copy."""
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = logits.float().log_softmax(-1) if want_logprobs else None
    constrained = [i for i, s in enumerate(seqs) if getattr(s, "matcher", None) is not None]
    penalized = any(s.params.needs_penalties for s in seqs)
    if constrained or penalized:
        logits = logits.clone() if logits.dtype == torch.float32 else logits.float()
    if constrained:  # the grammar's mask first: logprobs above stay the model's own
        from workers.engine.structured import apply_grammars

        apply_grammars(logits, constrained, [seqs[i].matcher for i in constrained])
    if penalized:
        apply_penalties(logits, seqs)
    chosen = fused_ops.greedy(logits)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filter(logits.index_select(0, rows).float(), [seqs[i] for i in sampled_rows])
        # A row that overflowed (a checkpoint's inf logits) has no distribution to draw from: it
        # keeps the most likely token, as greedy does (a mask, so no device sync per row).
        drawable = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
        for j, i in enumerate(sampled_rows):
            seq = seqs[i]
            g = torch.Generator(device=probs.device).manual_seed(token_seed(seq.seed, len(seq.output_token_ids)))
            # Exponential race: argmax(p / E), E ~ Exp(1), draws exactly from p with one generator call.
            noise = torch.empty_like(probs[j]).exponential_(generator=g)
            chosen[i] = torch.where(drawable[j], (probs[j] / noise).argmax(), chosen[i])
    ids = chosen.tolist()
    results = []
    for i, seq in enumerate(seqs):
        r = SampleResult(ids[i])
        n = seq.params.logprobs
        if n is not None:
            lp = raw_logprobs[i]
            r.logprob = float(lp[ids[i]])
            if n > 0:
                vals, idx = lp.topk(n)
                r.top_logprobs = list(zip(idx.tolist(), vals.tolist()))
        results.append(r)
    return results
