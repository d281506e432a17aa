"""Start a replica's ranks as local processes (no Ray): one process per rank.

The parent talks to rank 0 over a pipe (method calls); rank 0 drives the other ranks through
the step-plan broadcast. `close()` stops every process and leaves none behind.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection

from workers.errors import TpserveError, WorkerError
from workers.worker import Worker, WorkerSpec

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def threads_per_rank(ranks_on_node: int) -> int:
    """max(1, cores // ranks on this node): ranks sharing cores must not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_on_node))


def _rank_main(spec: WorkerSpec, rank: int, conn: Connection | None, ready) -> None:
    try:
        worker = Worker(spec, rank)
    except BaseException as e:  # report, then die: the parent raises a WorkerError
        ready.put((rank, "error", f"{type(e).__name__}: {e}"))
        return
    ready.put((rank, "ready", worker.load_report()))
    try:
        if rank == 0:
            _serve_calls(worker, conn)
        else:
            worker.follow()
    finally:
        worker.close()


def _serve_calls(worker: Worker, conn: Connection) -> None:
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:  # parent went away
            method, args, kwargs = "shutdown", (), {}
        if method == "shutdown":
            worker.stop_followers()
            return
        try:
            conn.send(("ok", getattr(worker, method)(*args, **kwargs)))
        except Exception as e:
            log.debug("call %s failed:\n%s", method, traceback.format_exc())
            conn.send(("err", e))


class LocalWorkerGroup:
    """A tensor-parallel replica as tp local processes; rank 0 answers `call(method, ...)`."""

    def __init__(self, spec: WorkerSpec, start_timeout_s: float = 300.0):
        if spec.dist_init_method is None and spec.tp_size > 1:
            spec = replace(spec, dist_init_method=f"tcp://127.0.0.1:{free_port()}")
        if spec.num_threads is None:
            spec = replace(spec, num_threads=threads_per_rank(spec.tp_size))
        self.spec = spec
        # Spinning OpenMP threads starve ranks that share cores; children inherit this at spawn.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        self._conn, child_conn = ctx.Pipe()
        self.processes = [ctx.Process(target=_rank_main, args=(spec, r, child_conn if r == 0 else None, ready),
                                      name=f"tpserve-rank{r}", daemon=True) for r in range(spec.tp_size)]
        for p in self.processes:
            p.start()
        self.reports: list[dict] = [{} for _ in self.processes]
        try:
            for _ in self.processes:
                rank, status, payload = self._wait_ready(ready, start_timeout_s)
                if status == "error":
                    raise WorkerError(f"rank {rank} failed to start: {payload}")
                self.reports[rank] = payload
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, ready, timeout_s: float):
        import queue
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return ready.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(f"{', '.join(dead)} exited during start-up") from None
        raise WorkerError(f"worker group did not start within {timeout_s:.0f}s")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def call(self, method: str, *args, **kwargs):
        """Run `Worker.method` on rank 0 (which drives the other ranks) and return its result."""
        self._conn.send((method, args, kwargs))
        while not self._conn.poll(0.2):
            dead = [p.name for p in self.processes if not p.is_alive()]
            if dead:
                raise WorkerError(f"{', '.join(dead)} died during {method}")
        status, value = self._conn.recv()
        if status == "err":
            dead = [p.name for p in self.processes if not p.is_alive()]
            if dead and not isinstance(value, TpserveError):  # a collective broke because a peer died
                raise WorkerError(f"{', '.join(dead)} died during {method}: {value}") from value
            raise value
        return value

    def close(self, timeout_s: float = 10.0) -> None:
        if self.processes and self.processes[0].is_alive():
            try:
                self._conn.send(("shutdown", (), {}))
            except (BrokenPipeError, OSError):
                pass
        for p in self.processes:
            p.join(timeout_s)
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join()
        self._conn.close()

    def __enter__(self) -> "LocalWorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessWorkerGroup:
    """tp 1 without a child process: the same interface as LocalWorkerGroup."""

    def __init__(self, spec: WorkerSpec):
        if spec.tp_size != 1:
            raise WorkerError(f"an in-process group has one rank, not {spec.tp_size}")
        self.spec = spec
        self.worker = Worker(spec, 0)
        self.reports = [self.worker.load_report()]

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    def call(self, method: str, *args, **kwargs):
        return getattr(self.worker, method)(*args, **kwargs)

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> "InProcessWorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_worker_group(spec: WorkerSpec) -> LocalWorkerGroup | InProcessWorkerGroup:
    """One replica's ranks: in this process at tp 1, one local process per rank above that."""
    return InProcessWorkerGroup(spec) if spec.tp_size == 1 else LocalWorkerGroup(spec)
