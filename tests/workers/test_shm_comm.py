"""Shared-memory collectives between real processes: results equal to the rank-order sum on every
rank (also when a tensor spans many slot rounds), a waiting rank sleeps instead of spinning,
and a peer that dies turns into WorkerError at once, not after the collective timeout."""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time

import torch
import torch.distributed as dist

from workers.comm_probe import measure_collectives
from workers.errors import WorkerError
from workers.launcher import free_port
from workers.shm_comm import ShmCommunicator

SLOT = 8192  # bytes: 2,048 floats, so the larger tensors below take several rounds


def _join(rank: int, size: int, port: int, timeout_s: float = 20.0) -> ShmCommunicator:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    shm = ShmCommunicator.create(rank, size, dist.group.WORLD, timeout_s, slot_bytes=SLOT)
    if shm is None:
        raise RuntimeError("ranks on one host got no shared segment")
    return shm


def _data(rank: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + rank))


def _collectives(rank: int, size: int, port: int, out) -> None:
    shm = _join(rank, size, port)
    report = {}
    for shape in [(576,), (3, 700), (5000,)]:  # one round, one round 2-D, three rounds
        x = _data(rank, shape)
        ref = _data(0, shape)
        for r in range(1, size):
            ref = ref + _data(r, shape)
        got = shm.all_reduce(x.clone())
        report[f"all_reduce{shape}"] = torch.equal(got, ref)
    t = _data(rank, (4, 6)).t()  # not contiguous
    ref = sum((_data(r, (4, 6)).t() for r in range(1, size)), _data(0, (4, 6)).t())
    report["all_reduce(non-contiguous)"] = torch.equal(shm.all_reduce(t.clone()), ref)
    sizes = [300 - r for r in range(size)]  # uneven vocab slices, 9 rows -> several rounds
    rows = 9
    mine = _data(rank, (rows, sizes[rank]))
    gathered = shm.gather_last_dim(mine, sizes)
    if rank == 0:
        ref = torch.cat([_data(r, (rows, sizes[r])) for r in range(size)], dim=1)
        report["gather"] = torch.equal(gathered, ref)
    else:
        report["gather"] = gathered is None
    for n in (5, 3000):  # a small plan, and one larger than a slot
        body = torch.arange(n, dtype=torch.int64) * 7
        got = shm.broadcast_bytes(body if rank == 0 else None)
        report[f"broadcast({n})"] = torch.equal(got, body)
    # Rank 1 arrives a second late: rank 0 must sleep through the wait, not spin on a core.
    if rank == 1:
        time.sleep(1.0)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
    t0 = time.perf_counter()
    shm.all_reduce(torch.ones(16))
    if rank == 0:
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
        report["wait_s"] = time.perf_counter() - t0
        report["wait_cpu_s"] = cpu - cpu0
    out.put((rank, report))
    shm.all_reduce(torch.ones(1))  # nobody leaves while another still reads its slots
    shm.close()
    dist.destroy_process_group()


def _dies(rank: int, size: int, port: int, out) -> None:
    shm = _join(rank, size, port, timeout_s=60.0)
    shm.all_reduce(torch.ones(8))
    if rank == 1:
        os._exit(0)  # gone without a word, mid-conversation
    t0 = time.perf_counter()
    try:
        shm.all_reduce(torch.ones(8))
        out.put(("returned", time.perf_counter() - t0))
    except WorkerError as e:
        out.put((str(e), time.perf_counter() - t0))


def _spawn(target, size: int):
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, size, port, out), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    return procs, out


def _finish(procs) -> None:
    for p in procs:
        p.join(timeout=20)
        if p.is_alive():
            p.kill()


def test_shm_collectives_equal_the_rank_order_sum_and_a_waiting_rank_sleeps():
    procs, out = _spawn(_collectives, 3)
    try:
        reports = dict(out.get(timeout=120) for _ in procs)
    finally:
        _finish(procs)
    for rank, report in reports.items():
        checks = {k: v for k, v in report.items() if not k.startswith("wait")}
        assert all(checks.values()), (rank, checks)
    assert reports[0]["wait_s"] > 0.8  # it did wait for the late rank ...
    assert reports[0]["wait_cpu_s"] < 0.3 * reports[0]["wait_s"]  # ... asleep, not spinning


def test_a_peer_that_exits_fails_the_collective_at_once_not_after_the_timeout():
    procs, out = _spawn(_dies, 2)
    try:
        message, waited = out.get(timeout=60)
    finally:
        _finish(procs)
    assert "exited during a collective" in message
    assert waited < 5  # the timeout is 60 s


def test_the_probe_times_every_step_collective_on_the_transport_the_group_used():
    for transport in ("shm", "gloo"):
        timings = measure_collectives(2, [576, 4000], iters=20, transport=transport)
        assert {(t.op, t.numel) for t in timings} == {("all_reduce", 576), ("all_reduce", 4000), ("gather", 576),
                                                       ("gather", 4000), ("broadcast", 128)}
        assert {t.transport for t in timings} == {transport}
        assert all(0 < t.median_us <= t.p90_us for t in timings)
