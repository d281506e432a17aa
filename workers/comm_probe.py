"""Time the collectives a step uses (all-reduce, logits gather, plan broadcast) between tp local
processes joined exactly as a replica's ranks are (`init_tp_group`).

Used by `benchmarks.collectives` and by `tpserve profile`; nothing here runs while serving.
"""
from __future__ import annotations

import os
import queue
import statistics
import time
from dataclasses import dataclass

import torch

from workers import set_openmp_env
from workers.errors import WorkerError

from workers.worker import WorkerSpec, init_tp_group


@dataclass(frozen=True, slots=True)
class CommTiming:
    op: str  # all_reduce | gather | broadcast
    transport: str  # shm | gloo (what the group actually used)
    tp: int
    numel: int  # float32 elements per rank (int64 for the broadcast)
    median_us: float
    p90_us: float


def _rank(spec: WorkerSpec, rank: int, sizes: list[int], iters: int, out) -> None:
    torch.set_num_threads(spec.num_threads or 1)
    group = init_tp_group(spec, rank)
    transport = "shm" if group.shm is not None else "gloo"
    rows = []
    try:
        for numel in sizes:
            x = torch.ones(numel)
            sample = []
            for i in range(iters + 5):
                t = time.perf_counter()
                group.all_reduce(x)
                if i >= 5:
                    sample.append(time.perf_counter() - t)
                x.fill_(1.0)
            rows.append(("all_reduce", numel, sample))
        # The logits gather: rows x (vocab / tp) per rank; here sizes are the per-rank widths of one row.
        for numel in sizes:
            sample = []
            x = torch.ones(1, numel)
            for i in range(iters + 5):
                t = time.perf_counter()
                group.gather_last_dim(x, [numel] * group.size)
                if i >= 5:
                    sample.append(time.perf_counter() - t)
            rows.append(("gather", numel, sample))
        from workers.step_plan import PlanChannel  # a decode plan: ~100 int64 for a few sequences

        channel = PlanChannel(group.cpu_group, rank, shm=group.shm)
        body = torch.arange(128, dtype=torch.int64)
        sample = []
        for i in range(iters + 5):
            t = time.perf_counter()
            if rank == 0:
                channel.send_body(body)
            else:
                channel.recv_body()
            if i >= 5:
                sample.append(time.perf_counter() - t)
        rows.append(("broadcast", 128, sample))
    finally:
        if group.shm is not None:
            group.shm.close()
        torch.distributed.destroy_process_group()
    if rank == 0:
        out.put((transport, rows))


def measure_collectives(tp: int, sizes: list[int], iters: int = 200, transport: str = "shm",
                        num_threads: int | None = None) -> list[CommTiming]:
    """Median and p90 per op and size, as rank 0 sees them (it waits on the slowest rank)."""
    from workers.launcher import free_port, rank_context, threads_per_rank, with_environ

    spec = WorkerSpec("", tp_size=tp, dist_init_method=f"tcp://127.0.0.1:{free_port()}",
                      num_threads=num_threads or threads_per_rank(tp), cpu_collectives=transport)
    set_openmp_env()
    ctx = rank_context()  # its ranks start as a replica's do
    out = ctx.Queue()
    procs = [ctx.Process(target=with_environ, args=(dict(os.environ), _rank, spec, r, sizes, iters, out), daemon=True)
             for r in range(tp)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                used, rows = out.get(timeout=0.5)
                break
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise WorkerError(f"the collective probe's ranks failed (exit codes "
                                      f"{[p.exitcode for p in procs]})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    result = []
    for op, numel, sample in rows:
        us = sorted(s * 1e6 for s in sample)
        result.append(CommTiming(op, used, tp, numel, statistics.median(us), us[int(0.9 * (len(us) - 1))]))
    return result
