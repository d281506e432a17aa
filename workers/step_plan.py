"""The compact plan rank 0 sends to the other ranks each step, and its one-broadcast transport.

A plan is packed into one int64 tensor. The transport broadcasts a fixed-size buffer over the
CPU (gloo) group, so a step costs one broadcast; a plan larger than the buffer (a long prefill)
spills into a second broadcast of exactly its size.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from workers.kv_cache import SeqChunk


class PlanOp(IntEnum):
    STEP = 1
    STOP = 2


@dataclass(slots=True)
class StepPlan:
    """Everything a rank needs to run one forward: tokens, positions, cache placement, outputs wanted."""

    op: PlanOp
    input_ids: list[int]
    positions: list[int]
    chunks: list[SeqChunk]
    logits_indices: list[int]

    @classmethod
    def stop(cls) -> "StepPlan":
        return cls(PlanOp.STOP, [], [], [], [])

    def encode(self) -> torch.Tensor:
        header = [int(self.op), len(self.chunks), len(self.input_ids), len(self.logits_indices)]
        flat = [x for c in self.chunks for x in (c.slot, c.start, c.length)]
        return torch.tensor(header + flat + self.input_ids + self.positions + self.logits_indices, dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> "StepPlan":
        v = t.tolist()
        op, n_chunks, n_tok, n_logits = v[:4]
        i = 4
        chunks = [SeqChunk(*v[i + 3 * k:i + 3 * k + 3]) for k in range(n_chunks)]
        i += 3 * n_chunks
        ids, pos = v[i:i + n_tok], v[i + n_tok:i + 2 * n_tok]
        i += 2 * n_tok
        return cls(PlanOp(op), ids, pos, chunks, v[i:i + n_logits])


class PlanChannel:
    """Broadcasts plans from rank 0 over a gloo group: one collective per step in the common case."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, capacity: int = 8192):
        self.group, self.rank, self.capacity = group, rank, capacity
        self.buffer = torch.zeros(capacity, dtype=torch.int64)
        self.broadcasts = 0

    def send(self, plan: StepPlan) -> None:
        body = plan.encode()
        n = body.numel()
        self.buffer[0] = n
        self.buffer[1:1 + min(n, self.capacity - 1)] = body[:self.capacity - 1]
        self._bcast(self.buffer)
        if n > self.capacity - 1:
            self._bcast(body)

    def recv(self) -> StepPlan:
        self._bcast(self.buffer)
        n = int(self.buffer[0])
        if n <= self.capacity - 1:
            return StepPlan.decode(self.buffer[1:1 + n])
        body = torch.empty(n, dtype=torch.int64)
        self._bcast(body)
        return StepPlan.decode(body)

    def _bcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.group)
        self.broadcasts += 1
