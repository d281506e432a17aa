"""EngineCore: rank 0's synchronous engine. add_request / abort / step.

Each step: schedule -> plan (one for every rank) -> `executor.execute(plan)` (forward and sampling
on the worker group, or a cost model's price: workers/engine/executor.py) -> commit (computed
tokens, block keys, finish rules, detokenizing) -> one list of deltas (the caller ships it as one
message per step).
"""
from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait

from dataclasses import dataclass, field

from workers.defaults import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from workers.engine.block_keys import BlockKeyer, new_salt
from workers.engine.block_manager import BlockManager
from workers.engine.detokenizer import DetokState, Detokenizer
from workers.engine.executor import Executor
from workers.engine.messages import EngineLoad, KVDigest
from workers.engine.outputs import EngineStats, RequestOutput
from workers.engine.sampler import PromptRow, SampleError, SampleResult
from workers.engine.sampling_params import SamplingError, SamplingParams
from workers.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from workers.engine.sequence import FinishReason, Sequence
from workers.engine.speculative import NgramProposer, SpeculativeConfig, Speculator, SpecRow
from workers.engine.structured import Grammars
from workers.errors import ConfigError
from workers.paged_cache import PagedSeq
from workers.step_plan import PlanOp, StepPlan

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineConfig:
    """Scheduling knobs of one replica's engine."""

    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    enable_prefix_caching: bool = True
    # Secret of the prefix cache's keyed block hash; one per cluster (the controller's config
    # carries it to every replica), random per engine when unset.
    block_key_salt: bytes = field(default_factory=new_salt, repr=False)
    speculative: SpeculativeConfig | None = None  # --speculative-config (workers/engine/speculative.py)

    def validate(self) -> "EngineConfig":
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.speculative is not None:
            self.speculative.validate()
        return self


def queued_tokens(seqs) -> tuple[int, int]:
    """(prompt tokens still to prefill, tokens still allowed to generate) of live sequences. A
    waiting sequence's prefill leaves out what the prefix cache held for it when it arrived."""
    prefill = decode = 0
    for s in seqs:
        computed = s.num_computed_tokens if s.block_table else max(s.num_computed_tokens, s.expected_cached_tokens)
        prefill += max(0, s.num_tokens - 1 - computed)
        decode += max(0, s.params.max_tokens - len(s.output_token_ids))
    return prefill, decode


@dataclass(slots=True)
class _Live:
    seq: Sequence
    detok: DetokState
    pending_logprobs: list
    # SamplingParams.prompt_logprobs: entry p scores prompt token p + 1 (scored positions survive a
    # preemption's recompute, so none is scored twice); sent once, with the first new token.
    prompt_logprobs: list = field(default_factory=list)
    prompt_logprobs_sent: bool = False


class EngineCore:
    """Continuous batching over the paged cache of `executor`'s replica (workers/engine/executor.py)."""

    def __init__(self, executor: Executor, tokenizer, config: EngineConfig | None = None, proposer=None):
        """`proposer`: what proposes tokens when `config.speculative` is set; the n-gram lookup
        by default, a draft model's (workers/engine/draft.py) built by the caller that holds it."""
        config = (config or EngineConfig()).validate()
        self.executor = executor
        self.vocab_size = executor.vocab_size
        self.max_model_len = executor.max_model_len
        self.eos_token_ids = set(executor.eos_token_ids)
        self.block_manager = BlockManager(executor.num_blocks, executor.block_size, config.enable_prefix_caching,
                                          BlockKeyer(config.block_key_salt))
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len), self.block_manager)
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self._tokenizer = tokenizer
        self.grammars = None  # workers/engine/structured.py, built at the first constrained request
        # Constrained requests whose grammar is still compiling: live, outside the scheduler.
        self.awaiting_grammar: dict[str, Future] = {}
        self.live: dict[str, _Live] = {}
        self.stats = EngineStats(num_blocks=executor.num_blocks)
        self._rng = random.Random(0x7E5E)
        self.speculator = None
        if config.speculative is not None:
            if proposer is None and config.speculative.method != "ngram":
                raise ConfigError("speculative-config.method", f"{config.speculative.method} needs its proposer")
            self.speculator = Speculator(config.speculative, proposer or NgramProposer(config.speculative))
        # Fault injection for the reliability tests (docs/reliability.md): a request with this
        # cache_salt raises outside the per-request guards, as an unknown bug its data triggers
        # would, so the replica fails and the frontend's dead-letter rule can be seen at work.
        self._failpoint_salt = os.environ.get("TPSERVE_FAILPOINT_SALT") or None

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    output_prefix: list[int] | None = None) -> None:
        """Queue a request; raises a typed error naming the field if it cannot be served.

        `output_prefix`: tokens this request already generated elsewhere (a replica that died) and
        the client already received. They are prefilled with the prompt, count as output (max_tokens,
        penalties, the seeded draw index) and are not streamed again, so the stream continues where
        it stopped with the tokens an uninterrupted run would give.
        """
        if request_id in self.live:
            raise ConfigError("request_id", f"{request_id!r} is already running")
        params.validate(self.vocab_size)
        if not prompt_token_ids:
            raise ConfigError("prompt", "is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ConfigError("prompt", f"{n} tokens; the context holds {self.max_model_len}")
        if n + params.max_tokens > self.max_model_len:
            raise SamplingError("max_tokens", f"prompt ({n}) + max_tokens ({params.max_tokens}) exceeds the "
                                              f"context of {self.max_model_len} tokens")
        need = self.block_manager.blocks_needed(n + params.max_tokens)
        if need > self.block_manager.num_blocks:
            raise SamplingError("max_tokens", f"prompt + max_tokens need {need} KV blocks; the cache has "
                                              f"{self.block_manager.num_blocks}")
        prefix = list(output_prefix or [])
        if len(prefix) >= params.max_tokens:
            raise ConfigError("output_prefix", f"{len(prefix)} tokens already generated; max_tokens is "
                                               f"{params.max_tokens}, so nothing is left to resume")
        bad = [t for t in prefix if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError("output_prefix", f"token id {bad[0]} is outside the vocabulary")
        seq = Sequence(request_id, list(prompt_token_ids), params, output_token_ids=prefix)
        seq.seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        detok = self.detok.start(seq.prompt_token_ids, params.stop, params.skip_special_tokens) if self.detok else None
        if detok is not None and prefix:
            self.detok.replay(detok, seq.all_token_ids, len(seq.prompt_token_ids))
        seq.expected_cached_tokens = self.block_manager.cached_prefix_tokens(seq)
        if params.structured is not None:
            if self._tokenizer is None:
                raise ConfigError("structured_outputs", "needs the engine's tokenizer")
            if self.grammars is None:
                self.grammars = Grammars(self._tokenizer, self.vocab_size, sorted(self.eos_token_ids))
            self.awaiting_grammar[request_id] = self.grammars.compile(params.structured)
            self.live[request_id] = _Live(seq, detok, [])
            return
        self.live[request_id] = _Live(seq, detok, [])
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its blocks; None if it is not (or no longer) live."""
        live = self.live.pop(request_id, None)
        if live is None:
            return None
        if self.awaiting_grammar.pop(request_id, None) is None:
            self.scheduler.finish(live.seq)
        self._forget(request_id)
        self.stats.aborted += 1
        live.seq.finish_reason = FinishReason.ABORT
        return self._output(live, [], final=True)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.awaiting_grammar)

    # ---- one step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        admitted = self._admit_compiled() if self.awaiting_grammar else []
        # A grammar's matcher cannot take back a rejected proposal: constrained requests decode plainly.
        proposals = self.speculator.propose([s for s in self.scheduler.running if s.matcher is None],
                                            self.max_model_len) if self.speculator else None
        sched = self.scheduler.schedule(proposals)
        if not sched.chunks:
            return admitted
        if self._failpoint_salt is not None and any(c.seq.params.cache_salt == self._failpoint_salt
                                                    for c in sched.chunks):
            raise RuntimeError("injected fault (TPSERVE_FAILPOINT_SALT)")
        plan, sampling = self._plan(sched)
        t = time.perf_counter()
        results = self.executor.execute(plan, sampling)
        if self.speculator is not None and all(c.spec or (c.num_tokens == 1 and c.seq.num_computed_tokens
                                                          >= len(c.seq.prompt_token_ids)) for c in sched.chunks):
            # A step that decodes only: what the speculation rule prices the next steps with.
            self.speculator.timed(len(plan.input_ids), time.perf_counter() - t)
        return admitted + self._commit(sched, sampling, results)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar has compiled go to the scheduler; one that failed to compile
        ends with its error. With nothing else to run, wait a moment for a compile (no spin)."""
        if not self.scheduler.has_work():
            futures_wait(list(self.awaiting_grammar.values()), timeout=0.01, return_when=FIRST_COMPLETED)
        outputs = []
        for rid, fut in list(self.awaiting_grammar.items()):
            if not fut.done():
                continue
            del self.awaiting_grammar[rid]
            live = self.live[rid]
            try:
                live.seq.matcher = self.grammars.matcher(fut.result(), live.seq.output_token_ids)
            except Exception as e:  # the spec's own fault: this request ends, naming the field
                self.live.pop(rid, None)
                live.seq.finish_reason = FinishReason.ERROR
                self.stats.failed += 1
                outputs.append(RequestOutput(rid, finished=True, finish_reason="error",
                                             error=str(e), error_field=getattr(e, "field", None) or "structured_outputs",
                                             prompt_tokens=len(live.seq.prompt_token_ids)))
                continue
            self.scheduler.add(live.seq)
        return outputs

    def _plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list[Sequence]]:
        """The step for every rank (each chunk's position, tokens and block table, the rows that
        sample) and the sequences those rows belong to, in order."""
        seqs, ids, logits_rows, sampling = [], [], [], []
        n_prefill = n_decode = 0
        for c in sched.chunks:
            s = c.seq
            start = s.num_computed_tokens
            seqs.append(PagedSeq(start, c.num_tokens, list(s.block_table)))
            if c.spec:  # the last token, then the proposals; every position samples
                ids.append(s.token_at(start))
                ids += c.spec
                logits_rows += range(len(ids) - 1 - len(c.spec), len(ids))
                sampling.append(s)
                sampling += (SpecRow(s, c.spec[:j]) for j in range(1, len(c.spec) + 1))
                n_decode += 1
                continue
            ids += s.all_token_ids[start:start + c.num_tokens]
            if s.params.prompt_logprobs is not None:  # rows that score the chunk's next prompt tokens
                first = len(ids) - c.num_tokens
                done = len(self.live[s.request_id].prompt_logprobs)
                for p in range(max(start, done), min(start + c.num_tokens, len(s.prompt_token_ids) - 1)):
                    logits_rows.append(first + p - start)
                    sampling.append(PromptRow(s, p, s.prompt_token_ids[p + 1]))
            if c.samples:
                logits_rows.append(len(ids) - 1)
                sampling.append(s)
            if c.num_tokens == 1 and start >= len(s.prompt_token_ids):
                n_decode += 1
            else:
                n_prefill += 1
        self._count_step(len(sched.chunks), n_prefill, n_decode)
        return StepPlan(PlanOp.STEP, seqs, ids, logits_rows), sampling

    def _commit(self, sched: SchedulerOutput, sampling: list[Sequence],
                results: list[SampleResult | SampleError]) -> list[RequestOutput]:
        """What the step computed becomes the engine's state: computed tokens, block keys, one
        new token per sampling sequence with the finish rules; a request whose own part fails
        ends alone with an error."""
        for c in sched.chunks:
            s = c.seq
            prompt_part = max(0, min(len(s.prompt_token_ids), s.num_computed_tokens + c.num_tokens)
                              - s.num_computed_tokens)
            s.num_computed_prefill_tokens += prompt_part
            self.stats.prompt_tokens_computed += prompt_part
            # A proposal's KV counts once it is accepted (`_append`).
            s.num_computed_tokens += c.num_tokens - len(c.spec)
        outputs: list[RequestOutput] = []
        failed: set[str] = set()
        for c in sched.chunks:  # block keys hash the request's own tokens and salt
            try:
                self.block_manager.register_computed(c.seq)
            except Exception as e:
                outputs.append(self.fail_request(c.seq.request_id, e))
                failed.add(c.seq.request_id)
        rows = iter(zip(sampling, results))
        spec_of = {c.seq.request_id: c.spec for c in sched.chunks if c.spec}
        for s, r in rows:
            if isinstance(s, PromptRow):
                live = self.live.get(s.request_id)
                if s.request_id in failed or live is None:
                    continue
                if isinstance(r, SampleError):
                    outputs.append(self.fail_request(s.request_id, r.cause))
                    failed.add(s.request_id)
                elif s.position == len(live.prompt_logprobs):
                    live.prompt_logprobs.append({"token_id": r.token_id, "logprob": r.logprob,
                                                 "top": r.top_logprobs or [], "rank": r.rank})
                continue
            spec = spec_of.get(s.request_id, ())
            got = [r] + [next(rows)[1] for _ in spec]  # a verified chunk's rows are consecutive
            if s.request_id in failed:
                continue
            bad = next((x for x in got if isinstance(x, SampleError)), None)
            if bad is not None:
                outputs.append(self.fail_request(s.request_id, bad.cause))
                continue
            try:
                out = self._append(self.live[s.request_id], got, spec)
            except Exception as e:  # stop checks, detokenizing: this request's own work
                out = self.fail_request(s.request_id, e)
            outputs.append(out)
        return outputs

    def fail_request(self, request_id: str, exc: BaseException) -> RequestOutput:
        """End one request with an error naming it; the engine goes on with the others."""
        log.error("request %s failed in the engine; finishing it alone", request_id, exc_info=exc)
        live = self.live.pop(request_id, None)
        seq = live.seq if live is not None else None
        if seq is not None and self.awaiting_grammar.pop(request_id, None) is None:
            try:
                self.scheduler.finish(seq)
            except Exception:  # its blocks may leak; the replica stays up for the others
                log.exception("freeing the blocks of failed request %s", request_id)
            seq.finish_reason = FinishReason.ERROR
        self._forget(request_id)
        self.stats.failed += 1
        return RequestOutput(request_id, finished=True, finish_reason="error", request_failed=True,
                             error=f"request {request_id} failed in the engine: {type(exc).__name__}: {exc}",
                             prompt_tokens=len(seq.prompt_token_ids) if seq else 0,
                             output_tokens=len(seq.output_token_ids) if seq else 0)

    def _count_step(self, n_seqs: int, n_prefill: int, n_decode: int) -> None:
        st = self.stats
        st.steps += 1
        st.max_seqs_in_step = max(st.max_seqs_in_step, n_seqs)
        if n_prefill and n_decode:
            st.mixed_steps += 1

    def _append(self, live: _Live, rows: list[SampleResult], spec=()) -> RequestOutput:
        """Row 0's token, then row j's while row j-1 drew proposal j-1 (its KV, computed this
        step, then counts), until a finish rule ends the request. A proposal that was not drawn
        and everything after it are dropped, and the blocks grown for them returned."""
        seq, new_ids = live.seq, []
        final = False
        for j, r in enumerate(rows):
            if j:
                if rows[j - 1].token_id != spec[j - 1]:
                    break
                seq.num_computed_tokens += 1
                self.block_manager.register_computed(seq)
            new_ids.append(r.token_id)
            final = self._take(live, r)
            if final:
                break
        if spec:
            self.speculator.verified(seq.request_id, len(spec), len(new_ids) - 1)
            if not final:
                self.block_manager.shrink(seq, seq.num_tokens)
        if final:
            self.live.pop(seq.request_id, None)
            self.scheduler.finish(seq)
            self.stats.finished += 1
            self._forget(seq.request_id)
        return self._output(live, new_ids, final)

    def _forget(self, request_id: str) -> None:
        if self.speculator is not None:
            self.speculator.forget(request_id)

    def _take(self, live: _Live, r: SampleResult) -> bool:
        """Append one sampled token and apply the finish rules; True when the request ends."""
        seq, p = live.seq, live.seq.params
        seq.append_token(r.token_id)
        self.stats.generated_tokens += 1
        if p.logprobs is not None:
            live.pending_logprobs.append({"token_id": r.token_id, "logprob": r.logprob, "top": r.top_logprobs or []})
        if not p.ignore_eos and r.token_id in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, r.token_id
        elif r.token_id in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, r.token_id
        if seq.matcher is not None and seq.finish_reason is None:
            # The mask allowed only this grammar's tokens; the end of the grammar ends the request
            # (at its stop token, even with ignore_eos: nothing may follow a complete answer).
            if not seq.matcher.accept_token(r.token_id):
                raise RuntimeError(f"token {r.token_id} was sampled against the request's grammar")
            if seq.matcher.is_terminated():
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, r.token_id
        if live.detok is not None and seq.finish_reason is None:
            hit = self.detok.add_token(live.detok, seq.all_token_ids)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, hit
        if seq.finish_reason is None and (len(seq.output_token_ids) >= p.max_tokens
                                          or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = FinishReason.LENGTH
        return seq.finish_reason is not None

    def _output(self, live: _Live, new_ids: list[int], final: bool) -> RequestOutput:
        seq = live.seq
        text = self.detok.take_delta(live.detok, final) if live.detok is not None else ""
        logprobs, live.pending_logprobs = (live.pending_logprobs or None), []
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and not live.prompt_logprobs_sent and (new_ids or final):
            prompt_logprobs, live.prompt_logprobs_sent = [None] + live.prompt_logprobs, True
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=text, finished=final,
            finish_reason=seq.finish_reason.value if final and seq.finish_reason else None,
            stop_reason=seq.stop_reason if final else None, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            prompt_tokens=len(seq.prompt_token_ids), output_tokens=len(seq.output_token_ids),
            cached_prompt_tokens=seq.num_prefix_cached_tokens,
            computed_prompt_tokens=seq.num_computed_prefill_tokens, num_preemptions=seq.num_preemptions)

    def load(self, added: tuple[tuple[str, int], ...] = ()) -> EngineLoad:
        """Tokens still to prefill (preempted ones count again) and tokens still allowed to generate."""
        prefill, decode = queued_tokens(live.seq for live in self.live.values())
        return EngineLoad(prefill, decode, len(self.scheduler.running), len(self.scheduler.waiting),
                          self.block_manager.num_free_blocks, self.block_manager.num_blocks, added)

    def kv_digest(self, kv_seq: int) -> KVDigest:
        """Every key the prefix cache can find now, numbered as the KVEvents sent so far."""
        bm = self.block_manager
        return KVDigest(kv_seq, bm.cached_keys(), bm.num_blocks, bm.block_size)

    def snapshot(self) -> EngineStats:
        st = self.stats
        st.running, st.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        st.free_blocks = self.block_manager.num_free_blocks
        st.preemptions = self.scheduler.num_preemptions
        st.prefix_hit_tokens = self.block_manager.stats.prefix_hit_tokens
        st.prefix_queried_tokens = self.block_manager.stats.prefix_queried_tokens
        if self.speculator is not None:
            sp = self.speculator.stats
            st.spec_drafts, st.spec_draft_tokens = sp.num_drafts, sp.num_draft_tokens
            st.spec_accepted_tokens, st.spec_paused = sp.num_accepted_tokens, sp.num_paused
            st.spec_declined = sp.num_declined
        return EngineStats(**{k: getattr(st, k) for k in st.__slots__})
