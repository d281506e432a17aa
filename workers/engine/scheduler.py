"""Iteration-level scheduling: every step, finished sequences have left and waiting ones join.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first (a decode costs one token; an unfinished prefill takes a chunk), then
waiting ones are admitted with as much of their prompt as fits: a long prompt is prefilled in
chunks across steps, so it never stalls everyone else's decoding. When blocks run out, the
youngest running sequence is preempted and later recomputed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.defaults import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from workers.engine.block_manager import BlockManager
from workers.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_model_len: int = 2048


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens [seq.num_computed_tokens, + num_tokens) run this step, proposals included
    # Proposed tokens (workers/engine/speculative.py) after the sequence's last one: the chunk
    # runs the last token and these, and each of their positions samples.
    spec: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's end, so its last position yields the next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens + len(self.spec)


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)  # first in line again: it is older than anything waiting
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(self, proposals: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """`proposals`: request id -> tokens proposed after a decoding sequence's last one; each
        is verified in this step if the token budget and the free blocks allow, else dropped."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            spec = proposals.get(seq.request_id, [])[:budget - 1] if proposals and n == 1 else []
            # Proposals take free blocks only, and leave one for each running sequence still to
            # schedule: a guess never preempts anyone.
            if spec and bm.num_free_blocks - (bm.blocks_needed(seq.num_computed_tokens + 1 + len(spec))
                                              - len(seq.block_table)) >= len(self.running) - i - 1 \
                    and bm.grow(seq, seq.num_computed_tokens + 1 + len(spec)):
                out.chunks.append(ScheduledChunk(seq, 1 + len(spec), spec))
                budget -= 1 + len(spec)
                i += 1
                continue
            while not bm.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:  # it preempted itself: nothing younger was left
                break
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.grow(seq, seq.num_computed_tokens + n):
                if not out.chunks and not self.running:
                    # Nothing else holds blocks, so it can never fit: admission must have refused it.
                    raise RuntimeError(f"request {seq.request_id} cannot fit in an empty KV cache")
                bm.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
