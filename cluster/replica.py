"""One replica under Ray: a placement group of tp bundles packed on one node, one actor per rank.

Each `RankActor` hosts a `workers.worker.Worker`; rank 0's also runs the `EngineLoop` on a thread.
The frontend talks to rank 0 only: `put` (add / abort / call messages) and `poll` (a batch of
per-step output messages). Actors are threaded so a poll can wait while a step runs.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.engine.client import EngineClient
from workers.engine.core import EngineConfig
from workers.engine.loop import EngineLoop, drain
from workers.launcher import load_detokenizer
from workers.worker import Worker, WorkerSpec

log = logging.getLogger(__name__)


@ray.remote(max_concurrency=8)
class RankActor:
    """One rank of a replica (a Ray actor in the replica's placement group)."""

    def __init__(self, replica_id: str, rank: int):
        self.replica_id, self.rank = replica_id, rank
        self.worker: Worker | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def node(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def rendezvous(self) -> str:
        """Rank 0: an address on its node where the others can join its process group."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def start(self, spec: WorkerSpec, engine_config: EngineConfig) -> dict:
        """Join the group and load this rank's shard (all ranks call this concurrently)."""
        self.worker = Worker(spec, self.rank)
        if self.rank == 0:
            from workers.engine.core import EngineCore

            engine = EngineCore(self.worker, load_detokenizer(spec.model_path), engine_config)
            target = EngineLoop(engine, self.inbox, self.outbox).run
        else:
            target = self.worker.follow
        self.thread = threading.Thread(target=self._run, args=(target,), name=f"tpserve-rank{self.rank}", daemon=True)
        self.thread.start()
        return {**self.worker.load_report(), **self.node()}

    def _run(self, target) -> None:
        try:
            target()
        except Exception:
            log.exception("rank %d of %s stopped", self.rank, self.replica_id)
            os._exit(1)  # a broken rank takes its actor down, so the controller sees it and heals

    def put(self, msg: tuple) -> None:
        self.inbox.put(msg)

    def poll(self, timeout: float = 0.5) -> list[tuple]:
        """Every output message ready now, waiting up to timeout for the first."""
        return drain(self.outbox, timeout)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self.rank == 0 and self.thread is not None:
            self.inbox.put(("shutdown",))
            self.thread.join(10)
        if self.worker is not None:
            self.worker.close()


class ActorInbox:
    """Queue-like `put` onto rank 0's actor (for EngineClient)."""

    def __init__(self, actor):
        self.actor = actor

    def put(self, msg: tuple) -> None:
        self.actor.put.remote(msg)


class ActorOutbox:
    """Queue-like `get` from rank 0's actor, buffering a poll's batch (for EngineClient)."""

    def __init__(self, actor):
        self.actor = actor
        self.buffer: list[tuple] = []

    def get(self, timeout: float = 0.5):
        if not self.buffer:
            try:
                self.buffer = ray.get(self.actor.poll.remote(timeout), timeout=timeout + 30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                raise EOFError(str(e)) from e
            if not self.buffer:
                raise queue.Empty
        return self.buffer.pop(0)


def engine_client(rank0) -> EngineClient:
    """A client of a replica's engine through its rank-0 actor."""
    return EngineClient(ActorInbox(rank0), ActorOutbox(rank0), is_alive=lambda: True)


@dataclass(slots=True)
class Replica:
    """A replica as the controller holds it."""

    replica_id: str
    tp_size: int
    placement: PlacementGroup
    actors: list
    state: str = "starting"  # starting | ready | unhealthy | stopping
    target_node: str | None = None  # the node its placement group was steered to
    workers: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    last_steps: int = -1
    last_progress: float = field(default_factory=time.monotonic)

    def describe(self) -> dict:
        return {"replica_id": self.replica_id, "state": self.state, "tp_size": self.tp_size,
                "workers": self.workers, "rank0": self.actors[0] if self.actors else None}


def place_replica(replica_id: str, spec: WorkerSpec, engine_config: EngineConfig, resources_per_rank: dict,
                  target_node: str | None, threads: int) -> Replica:
    """Reserve tp bundles packed on one node (the hint picks which), then start one actor per rank."""
    bundles = [dict(resources_per_rank) for _ in range(spec.tp_size)]
    pg = placement_group(bundles, strategy="STRICT_PACK", name=f"tpserve-{replica_id}",
                         _soft_target_node_id=target_node)
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
    actors = [RankActor.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        num_cpus=resources_per_rank.get("CPU", 0), num_gpus=resources_per_rank.get("GPU", 0),
        runtime_env={"env_vars": env}, name=f"tpserve-{replica_id}-rank{r}", lifetime=None,
    ).remote(replica_id, r) for r in range(spec.tp_size)]
    return Replica(replica_id, spec.tp_size, pg, actors, target_node=target_node)


def start_replica(rep: Replica, spec: WorkerSpec, engine_config: EngineConfig, threads: int,
                  timeout_s: float = 600) -> None:
    """Rendezvous at rank 0, load all shards in parallel, mark ready."""
    init = ray.get(rep.actors[0].rendezvous.remote(), timeout=timeout_s) if spec.tp_size > 1 else None
    spec = replace(spec, dist_init_method=init, num_threads=threads)
    rep.workers = ray.get([a.start.remote(spec, engine_config) for a in rep.actors], timeout=timeout_s)
    rep.state = "ready"


def stop_replica(rep: Replica, graceful: bool = True) -> None:
    """Stop the engine and leave the process group (graceful), then kill every rank's actor and
    free the placement group. Killing works on a stopped (SIGSTOP) process too."""
    rep.state = "stopping"
    if graceful:
        try:
            ray.get(rep.actors[0].stop.remote(), timeout=15)
        except Exception:  # already dead or hung: killing below is enough
            pass
    for a in rep.actors:
        ray.kill(a, no_restart=True)
    remove_placement_group(rep.placement)
