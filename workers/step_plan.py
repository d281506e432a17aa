"""The compact plan rank 0 sends to the other ranks each step, and its one-broadcast transport.

A plan is packed into one int64 tensor: per sequence its start position, new-token count and
block table; then the new token ids and the rows whose logits rank 0 wants. Positions and slot
mappings are derived on each rank. The transport broadcasts a fixed-size buffer over the CPU
(gloo) group, so a step costs one broadcast; a larger plan (a long prefill) spills into a second
broadcast of exactly its size. Ranks that share a host send it through shared memory instead
(workers/shm_comm.py): one round of exactly its length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from workers.paged_cache import PagedSeq
from workers.shm_comm import ShmCommunicator


class PlanOp(IntEnum):
    STEP = 1
    STOP = 2
    NOOP = 3  # a heartbeat: keeps idle followers inside the collective timeout


@dataclass(slots=True)
class StepPlan:
    """Everything a rank needs to run one forward."""

    op: PlanOp
    seqs: list[PagedSeq]
    input_ids: list[int]
    logits_indices: list[int]

    @classmethod
    def stop(cls) -> "StepPlan":
        return cls(PlanOp.STOP, [], [], [])

    @classmethod
    def noop(cls) -> "StepPlan":
        return cls(PlanOp.NOOP, [], [], [])

    def positions(self) -> list[int]:
        return [p for s in self.seqs for p in range(s.start, s.start + s.length)]

    def encode(self) -> torch.Tensor:
        v = [int(self.op), len(self.seqs), len(self.input_ids), len(self.logits_indices)]
        for s in self.seqs:
            v += [s.start, s.length, len(s.block_table), *s.block_table]
        return torch.tensor(v + self.input_ids + self.logits_indices, dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> "StepPlan":
        v = t.tolist()
        op, n_seqs, n_tok, n_logits = v[:4]
        i, seqs = 4, []
        for _ in range(n_seqs):
            start, length, nb = v[i:i + 3]
            seqs.append(PagedSeq(start, length, v[i + 3:i + 3 + nb]))
            i += 3 + nb
        return cls(PlanOp(op), seqs, v[i:i + n_tok], v[i + n_tok:i + n_tok + n_logits])


class PlanChannel:
    """Broadcasts plans from rank 0 over a gloo group: one collective per step in the common case."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, capacity: int = 16384,
                 shm: ShmCommunicator | None = None):
        self.group, self.rank, self.capacity, self.shm = group, rank, capacity, shm
        self.buffer = torch.zeros(capacity, dtype=torch.int64)
        self.broadcasts = 0
        self.last_send = time.monotonic()

    def send(self, plan: StepPlan) -> None:
        self.send_body(plan.encode())

    def recv(self) -> StepPlan:
        return StepPlan.decode(self.recv_body())

    def send_body(self, body: torch.Tensor) -> None:
        """Rank 0: an encoded plan (1-D int64) to every other rank."""
        if self.shm is not None:  # exactly its length, in one round up to the slot size
            self.shm.broadcast_bytes(body)
            self.broadcasts += 1
        else:
            n = body.numel()
            self.buffer[0] = n
            self.buffer[1:1 + min(n, self.capacity - 1)] = body[:self.capacity - 1]
            self._bcast(self.buffer)
            if n > self.capacity - 1:
                self._bcast(body)
        self.last_send = time.monotonic()

    def recv_body(self) -> torch.Tensor:
        if self.shm is not None:
            self.broadcasts += 1
            return self.shm.broadcast_bytes(None)
        self._bcast(self.buffer)
        n = int(self.buffer[0])
        if n <= self.capacity - 1:
            return self.buffer[1:1 + n]
        body = torch.empty(n, dtype=torch.int64)
        self._bcast(body)
        return body

    def _bcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self.group)
        self.broadcasts += 1
