"""The tensor-parallel group and the shard arithmetic every parallel layer uses.

Rule (one for heads, MLP columns and vocab rows): n items are cut into tp_size contiguous
ranges whose sizes differ by at most one, the larger ranges first. So any tp from 1 to n works,
not only divisors of n.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from workers.errors import ConfigError
from workers.shm_comm import ShmCommunicator
from workers.trace import region


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous ranges covering n items, larger ranges first."""
    if parts < 1:
        raise ConfigError("tp_size", f"must be >= 1, got {parts}")
    if parts > n:
        raise ConfigError("tp_size", f"{parts} exceeds the {n} items to split")
    base, extra = divmod(n, parts)
    return [base + 1 if r < extra else base for r in range(parts)]


def shard_range(n: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's range under split_sizes."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(frozen=True, slots=True)
class HeadShard:
    """The attention heads one rank owns.

    Query heads [q_start, q_end) and every KV head those queries read, [kv_start, kv_end).
    Under GQA a KV head whose query group straddles two ranges is copied on both ranks.
    """

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    group_size: int  # query heads per KV head

    @property
    def num_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start

    def kv_index(self) -> list[int]:
        """For each local query head, the index of its KV head among this rank's KV heads."""
        return [h // self.group_size - self.kv_start for h in range(self.q_start, self.q_end)]


def head_shard(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    if num_heads % num_kv_heads:
        raise ConfigError("num_key_value_heads", f"{num_kv_heads} does not divide num_attention_heads {num_heads}")
    if tp_size > num_heads:
        raise ConfigError("tp", f"tp={tp_size} exceeds the model's {num_heads} query heads; use 1..{num_heads}")
    g = num_heads // num_kv_heads
    q0, q1 = shard_range(num_heads, tp_size, tp_rank)
    return HeadShard(q0, q1, q0 // g, (q1 - 1) // g + 1, g)


@dataclass(slots=True)
class TPGroup:
    """One replica's tensor-parallel group: this rank, the group size and the process groups.

    `device_group` carries activations (NCCL on CUDA, gloo on CPU); `cpu_group` (gloo) carries
    the per-step plan that rank 0 broadcasts. On CPU, ranks that share a host hold `shm`, and
    activations, logits and plans go through shared memory instead (gloo stays the fallback).
    With size 1 no collective ever runs.
    """

    rank: int = 0
    size: int = 1
    device_group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    # Seconds spent inside all-reduce/gather on this rank (for the decode benchmark).
    comm_seconds: float = field(default=0.0)
    timed: bool = False
    # gloo on a CUDA device (tp > 1 on one GPU, for testing): collectives go through host memory.
    stage_on_host: bool = False
    shm: ShmCommunicator | None = None
    load_group: dist.ProcessGroup | None = None  # gloo, the long load timeout: load-time agreement
    # While a compiled step warms up (workers/compiled_step.py), all-reduces return this rank's
    # own part: ranks compile at their own pace and no step is served meanwhile.
    local_only: bool = False

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        return self._all_reduce(x)

    # A compiled region breaks its graph here: workers/compiled_step.py wraps this in
    # torch.compiler.disable when it first compiles (as a decorator it imported torch._dynamo,
    # 1.8 s of every rank's start, eager or not).
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.local_only:
            return x
        if self.stage_on_host and x.is_cuda:
            return x.copy_(self.all_reduce(x.cpu()))
        with region("tpserve.all_reduce"):
            if self.shm is not None:
                if self.timed:
                    t = time.perf_counter()
                    self.shm.all_reduce(x)
                    self.comm_seconds += time.perf_counter() - t
                    return x
                return self.shm.all_reduce(x)
            if self.timed:
                return self._timed(dist.all_reduce, x)
            dist.all_reduce(x, group=self.device_group)
            return x

    def gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Concatenate each rank's slice of the last dim on rank 0 (None elsewhere).

        Slices may differ by one in size; collectives need equal shapes, so each is padded to
        the largest and trimmed after.
        """
        if self.size == 1:
            return x
        if self.stage_on_host and x.is_cuda:
            out = self.gather_last_dim(x.cpu(), sizes)
            return None if out is None else out.to(x.device)
        if self.shm is not None:
            t = time.perf_counter()
            with region("tpserve.all_reduce"):
                out = self.shm.gather_last_dim(x.contiguous(), sizes)
            if self.timed:
                self.comm_seconds += time.perf_counter() - t
            return out
        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        t = time.perf_counter()
        with region("tpserve.all_reduce"):
            dist.gather(x, parts, dst=0, group=self.device_group)
        if self.timed:
            self._sync(x)
            self.comm_seconds += time.perf_counter() - t
        if self.rank != 0:
            return None
        return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)

    def _timed(self, fn, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        fn(x, group=self.device_group)
        self._sync(x)
        self.comm_seconds += time.perf_counter() - t
        return x

    @staticmethod
    def _sync(x: torch.Tensor) -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
