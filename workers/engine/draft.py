"""The draft-model proposer: a smaller model with the target's vocabulary proposes K tokens.

It lives on rank 0 beside the engine (tp 1, its own Worker, its own small paged cache and block
bookkeeping), and proposes greedily: K batched forwards per step for the sequences that
speculate, the first catching the draft's cache up with whatever the sequence accepted since.
Greedy proposals make the draft distribution one-hot, for which the engine's verification is
exactly the rejection sampler (workers/engine/speculative.py).

Rollback costs nothing here: per request it remembers the tokens whose KV its cache holds; the
next step keeps the common prefix with the sequence's real tokens and recomputes from there (the
rejected slots are simply overwritten).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from workers import fused_ops
from workers.engine.block_manager import BlockManager
from workers.errors import ConfigError
from workers.paged_cache import PagedSeq
from workers.step_plan import PlanOp, StepPlan

log = logging.getLogger(__name__)

# The draft's share of the target's KV budget per rank when none is given: it holds every
# speculating sequence's context at a fraction of the target's bytes per token.
DRAFT_KV_FRACTION = 0.25
DRAFT_CUDA_KV_BYTES = 1 << 30


@dataclass(slots=True, eq=False)
class _DraftSeq:
    """What the draft's cache holds for one request: `tokens[:computed]` have KV in `block_table`."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list = field(default_factory=list)  # BlockManager's protocol (no prefix cache here)


def draft_spec(target_spec, config):
    """The draft's WorkerSpec: the target's device, dtype and threads, tp 1, its own KV budget
    and the config's quantization."""
    from dataclasses import replace

    from workers.defaults import CPU_KV_CACHE_BYTES
    from workers.model_source import resolve_model

    if target_spec.device == "cuda":
        kv = DRAFT_CUDA_KV_BYTES
    else:
        kv = int((target_spec.kv_cache_memory or CPU_KV_CACHE_BYTES) * DRAFT_KV_FRACTION)
    return replace(target_spec, model_path=str(resolve_model(config.model)), tp_size=1, kv_cache_memory=kv,
                   compile=False, quantization=config.quantization, max_model_len=None, dist_init_method=None)


class DraftProposer:
    """Proposals from `worker` (a tp-1 Worker holding the draft)."""

    def __init__(self, config, worker, target_vocab_size: int, target_name: str = "the target"):
        draft_vocab = worker.config.vocab_size
        if draft_vocab != target_vocab_size:
            raise ConfigError("speculative-config.model", f"the draft {worker.spec.model_path} has a vocabulary of "
                                                          f"{draft_vocab} tokens, {target_name} {target_vocab_size}: "
                                                          f"a draft must share the target's tokenizer")
        self.config = config
        self.worker = worker
        self.blocks = BlockManager(worker.num_blocks, worker.block_size, enable_prefix_caching=False)
        self.seqs: dict[str, _DraftSeq] = {}

    def propose(self, seqs, tracks, budget) -> dict[str, list[int]]:
        todo: list[tuple[_DraftSeq, int]] = []
        for s in seqs:
            k = budget(s)
            if k <= 0:
                continue
            d = self.seqs.get(s.request_id)
            if d is None:
                d = self.seqs[s.request_id] = _DraftSeq(s.request_id)
            real = s.all_token_ids
            keep = 0  # the draft's KV stays valid up to the first token that differs
            limit = min(d.computed, len(real) - 1)  # the last real token runs again: its logits propose
            while keep < limit and d.tokens[keep] == real[keep]:
                keep += 1
            d.tokens, d.computed = list(real), keep
            # The draft computes positions up to len(real) + k - 2 (its last proposal needs no KV).
            if len(real) + k - 1 > self.worker.max_model_len or not self.blocks.grow(d, len(real) + k - 1):
                continue
            todo.append((d, k))
        if not todo:
            return {}
        out: dict[str, list[int]] = {d.request_id: [] for d, _ in todo}
        live = list(todo)
        first = True
        while live:
            plan_seqs, ids, rows = [], [], []
            for d, _ in live:
                start = d.computed
                new = d.tokens[start:] if first else d.tokens[-1:]
                plan_seqs.append(PagedSeq(start, len(new), list(d.block_table)))
                ids += new
                rows.append(len(ids) - 1)
            logits = self.worker.step(StepPlan(PlanOp.STEP, plan_seqs, ids, rows))
            picks = fused_ops.greedy(logits).tolist()
            first = False
            nxt = []
            for (d, k), tok in zip(live, picks):
                d.computed = len(d.tokens)
                out[d.request_id].append(tok)
                d.tokens.append(tok)
                if len(out[d.request_id]) < k:
                    nxt.append((d, k))
            live = nxt  # each sequence's last proposal has no KV yet: computed == len(tokens) - 1
        return out

    def forget(self, request_id: str) -> None:
        d = self.seqs.pop(request_id, None)
        if d is not None:
            self.blocks.free(d)


def build_draft_proposer(config, target_spec, target_vocab_size: int):
    """The draft's Worker, loaded on this (rank 0's) process, and its proposer."""
    from workers.worker import Worker

    spec = draft_spec(target_spec, config)
    worker = Worker(spec, 0)
    log.info("draft model %s loaded for speculative decoding (%d KV blocks)", spec.model_path, worker.num_blocks)
    return DraftProposer(config, worker, target_vocab_size, f"the target {target_spec.model_path}")
