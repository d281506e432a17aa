"""Start a replica: its ranks as local processes (or in this process at tp 1), rank 0 hosting
the engine loop, and an EngineClient for the caller.

Rank 0 drives the other ranks through the step-plan broadcast. `close()` stops every process
and leaves none behind. (Under Ray, actors host the same Worker and EngineLoop.)
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import threading
import time
from dataclasses import replace
from concurrent.futures import Future

from workers.engine.client import EngineClient
from workers.engine.core import EngineConfig
from workers.engine.messages import Shutdown
from workers import set_openmp_env
from workers.errors import WorkerError
from workers.rank import Rank, run_rank
from workers.worker import WorkerSpec, weights_folder

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def threads_per_rank(ranks_on_node: int) -> int:
    """max(1, cores // ranks on this node): ranks sharing cores must not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_on_node))


def with_environ(environ: dict[str, str], target, *args) -> None:
    """A rank process's entry (`rank_context`): a fork server's child inherits the server's
    environment, fixed when the first group started, so it takes the caller's as it was at the
    rank's start (a TPSERVE_* switch set since then), as a spawned child would, and runs target."""
    os.environ.clear()
    os.environ.update(environ)
    target(*args)


def _rank_process(rank: int, spec: WorkerSpec, engine_config: EngineConfig, inbox, outbox, ready) -> None:
    def report(built: Rank | BaseException) -> None:
        if isinstance(built, BaseException):  # the parent raises a WorkerError with this
            ready.put((rank, "error", f"{type(built).__name__}: {built}"))
        else:
            ready.put((rank, "ready", built.worker.load_report()))

    run_rank(spec, engine_config, rank, inbox, outbox, report)


# What the threading runtimes read once, as torch loads: a rank forked from the fork server runs
# with the values the server loaded torch under.
_LOAD_TIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_")
_forkserver_env: dict[str, str] | None = None


def _load_time_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_LOAD_TIME_PREFIXES)}


def rank_context():
    """How rank processes start. Ranks fork from a server process that has imported torch and this
    package once: a rank starts in a fraction of a second, where a spawned one spends ~2 s of CPU
    importing torch (tp 4 on 2 cores: 4.4 s -> 0.7 s to start, 1.6 -> 0.25 s to close). The
    server has run no torch op, so it has no OpenMP pool or other thread to lose at the fork. Where
    this process's OpenMP/MKL settings changed since the server loaded torch, ranks are spawned, so
    they load torch under the settings asked for. Start ranks through `with_environ`."""
    global _forkserver_env
    env = _load_time_env()
    if _forkserver_env is None:
        _forkserver_env = env  # the server starts with this environment at the first rank's start
    if env != _forkserver_env:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["workers.launcher"])
    return ctx


class LocalWorkerGroup:
    """A tensor-parallel replica as tp local processes; `engine` is its client."""

    def __init__(self, spec: WorkerSpec, engine_config: EngineConfig | None = None, start_timeout_s: float = 300.0):
        if spec.dist_init_method is None and spec.tp_size > 1:
            spec = replace(spec, dist_init_method=f"tcp://127.0.0.1:{free_port()}")
        if spec.num_threads is None:
            spec = replace(spec, num_threads=threads_per_rank(spec.tp_size))
        self.spec = spec
        # Spinning OpenMP threads starve ranks that share cores; libgomp reads this as the rank
        # imports torch (in the fork server below, started by the first group).
        set_openmp_env()
        ctx = rank_context()
        ready, self._inbox, self._outbox = ctx.Queue(), ctx.Queue(), ctx.Queue()
        engine_config = engine_config or EngineConfig()
        args = (spec, engine_config, self._inbox, self._outbox, ready)
        self.processes = [ctx.Process(target=with_environ, args=(dict(os.environ), _rank_process, r, *args),
                                      name=f"tpserve-rank{r}", daemon=True) for r in range(spec.tp_size)]
        for p in self.processes:
            p.start()
        self.reports: list[dict] = [{} for _ in self.processes]
        self.engine: EngineClient | None = None
        try:
            for _ in self.processes:
                rank, status, payload = self._wait_ready(ready, start_timeout_s)
                if status == "error":
                    raise WorkerError(f"rank {rank} failed to start: {payload}")
                self.reports[rank] = payload
        except BaseException:
            self.close()
            raise
        self.engine = EngineClient(self._inbox, self._outbox,
                                   is_alive=lambda: all(p.is_alive() for p in self.processes))

    def _wait_ready(self, ready, timeout_s: float):
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
        """Run a method on rank 0 between engine steps and return its result."""
        return self.engine.call(method, *args, **kwargs)

    def close(self, timeout_s: float = 10.0) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.processes and self.processes[0].is_alive():
            self._inbox.put(Shutdown())
        for p in self.processes:
            p.join(timeout_s)
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join()

    def __enter__(self) -> "LocalWorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessWorkerGroup:
    """tp 1 without a child process: the engine loop runs on a thread; same interface.

    Start it before this process runs parallel torch ops on another thread: libgomp then keeps a
    second pool of worker threads, more than the CPUs, and stops spinning between parallel regions,
    so the engine's small ops run several times slower (docs/benchmarks.md, seventh session)."""

    def __init__(self, spec: WorkerSpec, engine_config: EngineConfig | None = None):
        if spec.tp_size != 1:
            raise WorkerError(f"an in-process group has one rank, not {spec.tp_size}")
        self.spec = spec
        self._inbox, self._outbox = queue.Queue(), queue.Queue()
        built: Future = Future()
        self._thread = threading.Thread(target=run_rank, name="tpserve-engine", daemon=True,
                                        args=(spec, engine_config or EngineConfig(), 0, self._inbox, self._outbox,
                                              built.set_result))
        self._thread.start()
        rank = built.result()
        if isinstance(rank, BaseException):
            self._thread.join()
            raise rank
        self.reports = [rank.worker.load_report()]
        self.engine = EngineClient(self._inbox, self._outbox, is_alive=self._thread.is_alive)

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    def call(self, method: str, *args, **kwargs):
        return self.engine.call(method, *args, **kwargs)

    def close(self) -> None:
        self.engine.close()
        self._inbox.put(Shutdown())
        self._thread.join(10)

    def __enter__(self) -> "InProcessWorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_worker_group(spec: WorkerSpec, engine_config: EngineConfig | None = None):
    """One replica: in this process at tp 1, one local process per rank above that."""
    weights_folder(spec)  # quantize once here (if asked and not cached), not in every rank at once
    if spec.tp_size == 1:
        return InProcessWorkerGroup(spec, engine_config)
    return LocalWorkerGroup(spec, engine_config)
